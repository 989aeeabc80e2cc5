// The manifest's prompt plans (echoembed.echo.plan.PromptPlan) and the prompt assembly that
// echoembed.echo.encode does with them: per-piece max_length, then the context water fill; and
// the baked shared prefix of a format-5 artifact (echoembed.echo.prefix).
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace echo {

struct PlanPiece {
  bool pooled = false;
  bool capped = false;  // cut to the shared cap when the prompt overflows the context
  bool has_text = false;
  std::vector<int64_t> ids;        // fixed pieces
  std::vector<std::string> parts;  // text pieces: tokenize parts[0] + text + parts[1] + ...

  std::string source_for(const std::string& text) const {
    std::string s = parts.at(0);
    for (size_t i = 1; i < parts.size(); ++i) s += text + parts[i];
    return s;
  }
};

struct PromptPlan {
  std::string template_name;
  std::vector<PlanPiece> pieces;
  std::optional<int64_t> max_length;
  std::optional<int64_t> context_length;
  int64_t pad_id = 0;
  bool overflow_error = false;
};

struct Row {
  std::vector<int64_t> ids;
  std::vector<int64_t> pool;  // 1 where the token is pooled
  bool truncated = false;
};

inline std::optional<int64_t> optional_int(const nlohmann::json& j) {
  if (j.is_null()) return std::nullopt;
  return j.get<int64_t>();
}

// Parse one plan from the manifest's JSON (nlohmann throws on wrong types or missing keys).
inline PromptPlan parse_plan(const nlohmann::json& j) {
  PromptPlan plan;
  plan.template_name = j.at("template").get<std::string>();
  plan.max_length = optional_int(j.at("max_length"));
  plan.context_length = optional_int(j.at("context_length"));
  plan.pad_id = j.at("pad_id").get<int64_t>();
  const auto overflow = j.value("overflow", std::string("truncate"));
  if (overflow != "truncate" && overflow != "error")
    throw std::runtime_error("plan " + plan.template_name + ": unknown overflow " + overflow);
  plan.overflow_error = overflow == "error";
  for (const auto& p : j.at("pieces")) {
    PlanPiece piece;
    piece.pooled = p.at("pooled").get<bool>();
    piece.capped = p.at("capped").get<bool>();
    if (!p.at("parts").is_null()) {
      piece.has_text = true;
      piece.parts = p.at("parts").get<std::vector<std::string>>();
      if (piece.parts.size() < 2)
        throw std::runtime_error("plan " + plan.template_name + ": a text piece needs 2+ parts");
    } else {
      piece.ids = p.at("ids").get<std::vector<int64_t>>();
    }
    plan.pieces.push_back(std::move(piece));
  }
  return plan;
}

// Largest cap c >= 1 with sum(min(len, c)) <= budget (echo.plan.water_fill).
inline int64_t water_fill(const std::vector<int64_t>& lengths, int64_t budget) {
  int64_t lo = 1, hi = *std::max_element(lengths.begin(), lengths.end());
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    int64_t total = 0;
    for (auto n : lengths) total += std::min(n, mid);
    if (total <= budget)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// One prompt from the ids of its text pieces (already tokenized, in piece order). `label` names
// the text in errors.
inline Row assemble(const PromptPlan& plan, const std::vector<std::vector<int64_t>>& text_ids,
                    const std::string& label) {
  std::vector<std::vector<int64_t>> pieces;
  size_t k = 0;
  for (const auto& p : plan.pieces) {
    if (!p.has_text) {
      pieces.push_back(p.ids);
      continue;
    }
    auto ids = text_ids.at(k++);
    if (plan.max_length && static_cast<int64_t>(ids.size()) > *plan.max_length)
      ids.resize(static_cast<size_t>(*plan.max_length));
    pieces.push_back(std::move(ids));
  }
  int64_t total = 0;
  for (const auto& p : pieces) total += static_cast<int64_t>(p.size());
  Row row;
  if (plan.context_length && total > *plan.context_length) {
    const int64_t limit = *plan.context_length;
    if (plan.overflow_error)
      throw std::runtime_error(label + " makes a prompt of " + std::to_string(total) +
                               " tokens, over the model's context of " + std::to_string(limit));
    int64_t fixed = 0;
    std::vector<int64_t> lengths;
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (plan.pieces[i].capped)
        lengths.push_back(static_cast<int64_t>(pieces[i].size()));
      else
        fixed += static_cast<int64_t>(pieces[i].size());
    }
    const int64_t budget = limit - fixed;
    if (budget < static_cast<int64_t>(lengths.size()))
      throw std::runtime_error("the template's fixed parts alone take " + std::to_string(fixed) +
                               " of " + std::to_string(limit) + " context tokens");
    const int64_t cap = water_fill(lengths, budget);
    for (size_t i = 0; i < pieces.size(); ++i)
      if (plan.pieces[i].capped && static_cast<int64_t>(pieces[i].size()) > cap)
        pieces[i].resize(static_cast<size_t>(cap));
    row.truncated = true;
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    row.ids.insert(row.ids.end(), pieces[i].begin(), pieces[i].end());
    row.pool.insert(row.pool.end(), pieces[i].size(), plan.pieces[i].pooled ? 1 : 0);
  }
  return row;
}

// The shared prefix baked into a prefix-reuse artifact (manifest "prefix", format 5): the graph
// takes every prompt without these leading ids.
struct Prefix {
  std::string template_name;  // the template it was taken from
  std::string text;           // the prefix decoded, for messages
  std::vector<int64_t> ids;
};

// The manifest's "prefix": null (or absent, formats 1-4) -> nullopt.
inline std::optional<Prefix> parse_prefix(const nlohmann::json& manifest) {
  const auto it = manifest.find("prefix");
  if (it == manifest.end() || it->is_null()) return std::nullopt;
  Prefix p;
  p.template_name = it->at("template").get<std::string>();
  p.text = it->at("text").get<std::string>();
  p.ids = it->at("ids").get<std::vector<int64_t>>();
  if (p.ids.empty()) throw std::runtime_error("the manifest's prefix has no ids");
  return p;
}

// The ids every prompt of `plan` starts with: its leading fixed, uncapped, unpooled pieces
// (echo.leading_fixed_ids).
inline std::vector<int64_t> leading_fixed_ids(const PromptPlan& plan) {
  std::vector<int64_t> out;
  for (const auto& p : plan.pieces) {
    if (p.has_text || p.capped || p.pooled) break;
    out.insert(out.end(), p.ids.begin(), p.ids.end());
  }
  return out;
}

inline bool starts_with(const std::vector<int64_t>& v, const std::vector<int64_t>& head) {
  return v.size() >= head.size() && std::equal(head.begin(), head.end(), v.begin());
}

// `row` without the prefix, as the graph takes it (echo.strip_prefix): the row must start with
// the prefix ids, pool none of them and keep at least one token after them. `label` names the
// row in errors.
inline Row strip_prefix(const Row& row, const Prefix& prefix, const std::string& label) {
  const size_t n = prefix.ids.size();
  const bool pooled = row.pool.size() >= n &&
                      std::any_of(row.pool.begin(), row.pool.begin() + static_cast<long>(n),
                                  [](int64_t f) { return f != 0; });
  if (!starts_with(row.ids, prefix.ids) || row.ids.size() == n || pooled) {
    std::string start;
    for (size_t i = 0; i < std::min(n, row.ids.size()); ++i)
      start += (i ? " " : "") + std::to_string(row.ids[i]);
    std::string want;
    for (size_t i = 0; i < n; ++i) want += (i ? " " : "") + std::to_string(prefix.ids[i]);
    throw std::runtime_error(
        label + ": the prompt does not start with the " + std::to_string(n) +
        " prefix ids baked into this artifact ([" + want + "], template " +
        prefix.template_name + "; the prompt starts [" + start +
        "]), or pools them or has nothing after them: embed it with template " +
        prefix.template_name + ", or re-export the artifact without --prefix-reuse");
  }
  Row out;
  out.ids.assign(row.ids.begin() + static_cast<long>(n), row.ids.end());
  out.pool.assign(row.pool.begin() + static_cast<long>(n), row.pool.end());
  out.truncated = row.truncated;
  return out;
}

}  // namespace echo
