// The manifest's prompt plans (echoembed.echo.plan.PromptPlan) and the prompt assembly that
// echoembed.echo.encode does with them: per-piece max_length, then the context water fill.
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

}  // namespace echo
