// echoembed-cpp: echo embeddings from an echoembed artifact, with no Python in the loop.
//
//   echoembed-cpp ARTIFACT [--template NAME] [--ids] [--batch-size N] [--threads N]
//                 [--no-normalize] [--repeat N]  < texts.txt > embeddings.txt
//
// Reads manifest.json (its prompt plans, format 3), tokenizes every template piece on its own
// with onnxruntime-extensions (no special tokens), assembles input_ids / attention_mask /
// pool_mask exactly as echoembed.echo does, runs the artifact's graph with ONNX Runtime and
// prints one line of space-separated floats per input line (L2-normalized, %.9g), in input
// order. --ids prints "ids<TAB>pool flags<TAB>truncated" per line instead of running the model.
// A prefix-reuse artifact (manifest "prefix", format 5) has its template's constant leading ids
// baked into the graph: each assembled prompt is checked to start with them and fed without them
// (--ids still prints the whole prompt, as `Embedder.encoder().encode_ids` gives it); a template
// whose prompts do not start with them is refused.
// Errors go to stderr with exit status 2 (bad input or artifact) or 1 (ONNX Runtime failed).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <numeric>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "ortx_tokenizer_api.h"
#include "plan.hpp"
#include "text.hpp"

namespace {

// 4 added the fusion record (nothing for this program to do); 5 added "prefix", the shared
// prefix baked into the graph, which this program checks and strips from every prompt.
constexpr int kNewestFormat = 5;
// onnxruntime-extensions wants a tokenizer_config.json beside tokenizer.json; tokenizer.json
// holds the whole pipeline, so the generic fast-tokenizer class is all it needs.
constexpr const char* kTokenizerConfig = R"({"tokenizer_class": "PreTrainedTokenizerFast"})";

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string artifact;
  std::string template_name;  // empty: the artifact's default
  bool ids = false;
  bool normalize = true;
  int batch_size = 32;
  int threads = 0;  // 0: ONNX Runtime's default
  int repeat = 1;
};

[[noreturn]] void usage(const std::string& why) {
  throw UserError(why +
                  "\nusage: echoembed-cpp ARTIFACT [--template NAME] [--ids] [--batch-size N] "
                  "[--threads N] [--no-normalize] [--repeat N] < texts.txt > embeddings.txt");
}

int positive(const std::string& flag, const char* value) {
  char* end = nullptr;
  const long n = value ? std::strtol(value, &end, 10) : 0;
  if (!value || *end != '\0' || n < 1 || n > 1 << 20) usage(flag + " needs a positive integer");
  return static_cast<int>(n);
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--template") {
      if (!next) usage("--template needs a name");
      o.template_name = next, ++i;
    } else if (a == "--ids") {
      o.ids = true;
    } else if (a == "--no-normalize") {
      o.normalize = false;
    } else if (a == "--batch-size") {
      o.batch_size = positive(a, next), ++i;
    } else if (a == "--threads") {
      o.threads = positive(a, next), ++i;
    } else if (a == "--repeat") {
      o.repeat = positive(a, next), ++i;
    } else if (a == "-h" || a == "--help") {
      usage("echo embeddings of stdin, one text per line");
    } else if (!a.empty() && a[0] == '-') {
      usage("unknown option " + a);
    } else if (o.artifact.empty()) {
      o.artifact = a;
    } else {
      usage("one ARTIFACT only (got " + o.artifact + " and " + a + ")");
    }
  }
  if (o.artifact.empty()) usage("give the artifact directory");
  return o;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError("cannot read " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

struct Artifact {
  nlohmann::json manifest;
  echo::PromptPlan plan;
  std::optional<echo::Prefix> prefix;  // baked shared prefix: the graph takes prompts without it
  std::string model_path;
  std::string tokenizer_path;
  std::string output_name;
};

// A template other than the baked one is accepted when its constant leading ids begin with the
// baked ones (the prefix's keys and values depend on those tokens only): echo.check_plan_prefix.
void check_plan_prefix(const echo::PromptPlan& plan, const echo::Prefix& prefix) {
  const auto lead = echo::leading_fixed_ids(plan);
  if (echo::starts_with(lead, prefix.ids)) return;
  const auto ids = [](const std::vector<int64_t>& v) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? " " : "") + std::to_string(v[i]);
    return "[" + s + "]";
  };
  throw UserError("template " + plan.template_name + " starts with " + ids(lead) + " (" +
                  std::to_string(lead.size()) +
                  " constant tokens), but this artifact has the prefix of template " +
                  prefix.template_name + " baked in ('" + prefix.text + "', " +
                  std::to_string(prefix.ids.size()) + " tokens " + ids(prefix.ids) +
                  "): use --template " + prefix.template_name +
                  " (or one starting with the same text), or re-export without --prefix-reuse "
                  "to serve any template");
}

Artifact open_artifact(const Options& o) {
  const std::string& root = o.artifact;
  if (!is_dir(root)) throw UserError(root + " is not a directory; pass an artifact directory");
  const std::string mpath = root + "/manifest.json";
  if (!is_file(mpath))
    throw UserError(root + " has no manifest.json: not an echoembed artifact (create one with "
                           "`echoembed export MODEL OUT`)");
  Artifact a;
  try {
    a.manifest = nlohmann::json::parse(read_file(mpath));
  } catch (const nlohmann::json::exception& e) {
    throw UserError(mpath + " is not valid JSON (" + e.what() + "); re-export the artifact");
  }
  const auto& m = a.manifest;
  try {
    const int version = m.at("format_version").get<int>();
    if (version > kNewestFormat)
      throw UserError(mpath + ": format " + std::to_string(version) +
                      " is newer than this program reads (" + std::to_string(kNewestFormat) +
                      "); rebuild examples/cpp from the matching echoembed");
    const auto plans = m.value("prompt_plans", nlohmann::json::array());
    if (plans.empty())
      throw UserError(mpath + " (format " + std::to_string(version) +
                      ") records no prompt plans, which this program needs; re-export the "
                      "artifact with this echoembed (`echoembed export MODEL OUT --force`, or "
                      "`make demo` for artifacts/), then quantize again from the new export");
    const std::string name =
        o.template_name.empty() ? m.at("default_template").get<std::string>() : o.template_name;
    const nlohmann::json* found = nullptr;
    for (const auto& p : plans)
      if (p.at("template").get<std::string>() == name) found = &p;
    if (!found) {
      std::string known;
      for (const auto& p : plans) known += (known.empty() ? "" : ", ") + p.at("template").get<std::string>();
      bool shipped = false;
      for (const auto& t : m.at("templates")) shipped |= t.at("name").get<std::string>() == name;
      throw UserError(shipped ? "template " + name +
                                    " has no prompt plan in this artifact (its tokenizer cannot "
                                    "encode it); templates with a plan: " + known
                              : "unknown template " + name + "; this artifact has: " + known);
    }
    a.plan = echo::parse_plan(*found);
    a.prefix = echo::parse_prefix(m);
    if (a.prefix) check_plan_prefix(a.plan, *a.prefix);
    a.model_path = root + "/" + m.at("model_file").get<std::string>();
    a.output_name = m.at("outputs").at(0).at("name").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw UserError(mpath + ": malformed manifest (" + e.what() + "); re-export the artifact");
  } catch (const UserError&) {
    throw;
  } catch (const std::runtime_error& e) {
    throw UserError(mpath + ": malformed manifest (" + e.what() + "); re-export the artifact");
  }
  a.tokenizer_path = root + "/tokenizer.json";
  if (!is_file(a.tokenizer_path))
    throw UserError(root + ": tokenizer.json is missing; copy the whole artifact directory");
  if (!o.ids && !is_file(a.model_path))
    throw UserError(root + ": model file " + a.model_path + " is missing");
  return a;
}

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& tokenizer_json_path)
      : vocab_(read_file(tokenizer_json_path)), config_(kTokenizerConfig) {
    OrtxTokenizerBlob blob{config_.data(), vocab_.data(), nullptr, nullptr, nullptr,
                           config_.size(), vocab_.size(), 0,       0,       0};
    if (OrtxCreateTokenizerFromBlob(&tok_, &blob) != 0)
      throw UserError(tokenizer_json_path + ": onnxruntime-extensions cannot load it: " +
                      OrtxGetLastErrorMessage());
    const char* keys[] = {"add_special_tokens"};
    const char* values[] = {"false"};
    if (OrtxUpdateTokenizerOptions(tok_, keys, values, 1) != 0)
      throw UserError(std::string("cannot turn off special tokens: ") + OrtxGetLastErrorMessage());
  }
  ~Tokenizer() {
    if (tok_) OrtxDisposeOnly(tok_);
  }
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of each string, tokenized on its own, without special tokens.
  std::vector<std::vector<int64_t>> encode(const std::vector<std::string>& strings) const {
    std::vector<const char*> ptrs;
    for (const auto& s : strings) ptrs.push_back(s.c_str());
    OrtxObject* out = nullptr;
    if (OrtxTokenize(tok_, ptrs.data(), ptrs.size(), &out) != 0)
      throw UserError(std::string("the tokenizer rejected the input: ") +
                      OrtxGetLastErrorMessage());
    std::vector<std::vector<int64_t>> result(strings.size());
    size_t n = 0;
    OrtxTokenId2DArrayGetBatch(out, &n);
    if (n != strings.size()) {
      OrtxDisposeOnly(out);
      throw UserError("the tokenizer returned " + std::to_string(n) + " rows for " +
                      std::to_string(strings.size()) + " strings");
    }
    for (size_t i = 0; i < n; ++i) {
      const uint32_t* ids = nullptr;
      size_t len = 0;
      OrtxTokenId2DArrayGetItem(out, i, &ids, &len);
      result[i].assign(ids, ids + len);
    }
    OrtxDisposeOnly(out);
    return result;
  }

 private:
  std::string vocab_, config_;
  OrtxObject* tok_ = nullptr;
};

std::vector<echo::Line> read_texts() {
  std::string data{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
  std::vector<echo::Line> lines;
  try {
    lines = echo::split_lines(data);
  } catch (const std::runtime_error& e) {
    throw UserError(std::string("stdin: ") + e.what());
  }
  if (lines.empty()) throw UserError("stdin holds no texts: give one text per line");
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string where = "stdin:" + std::to_string(i + 1);
    if (lines[i].blank)
      throw UserError(where + " is blank: every line must hold one text; remove it");
    if (lines[i].has_nul)
      throw UserError(where + " holds a NUL character, which the tokenizer's C API cannot "
                              "take; remove it or embed this text with the Python runtime");
  }
  return lines;
}

// Every text through the plan: one tokenizer call per chunk of texts.
std::vector<echo::Row> encode_rows(const echo::PromptPlan& plan, const Tokenizer& tok,
                                   const std::vector<echo::Line>& lines) {
  std::vector<size_t> text_pieces;
  for (size_t i = 0; i < plan.pieces.size(); ++i)
    if (plan.pieces[i].has_text) text_pieces.push_back(i);
  const size_t chunk = 256;
  std::vector<echo::Row> rows;
  rows.reserve(lines.size());
  for (size_t start = 0; start < lines.size(); start += chunk) {
    const size_t stop = std::min(lines.size(), start + chunk);
    std::vector<std::string> strings;
    for (size_t t = start; t < stop; ++t)
      for (auto i : text_pieces) strings.push_back(plan.pieces[i].source_for(lines[t].text));
    const auto ids = tok.encode(strings);
    for (size_t t = start; t < stop; ++t) {
      const auto first = ids.begin() + static_cast<long>((t - start) * text_pieces.size());
      std::vector<std::vector<int64_t>> text_ids(first, first + static_cast<long>(text_pieces.size()));
      try {
        rows.push_back(echo::assemble(plan, text_ids, "stdin:" + std::to_string(t + 1)));
      } catch (const std::runtime_error& e) {
        throw UserError(e.what());
      }
    }
  }
  return rows;
}

// The rows as the graph takes them: without the baked prefix, if the artifact has one.
std::vector<echo::Row> graph_rows(const Artifact& a, std::vector<echo::Row> rows) {
  if (!a.prefix) return rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    try {
      rows[i] = echo::strip_prefix(rows[i], *a.prefix, "stdin:" + std::to_string(i + 1));
    } catch (const std::runtime_error& e) {
      throw UserError(e.what());
    }
  }
  return rows;
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? " " : "") + std::to_string(v[i]);
  return s;
}

class Model {
 public:
  Model(const Artifact& a, int threads)
      : env_(ORT_LOGGING_LEVEL_WARNING, "echoembed-cpp"), output_name_(a.output_name) {
    Ort::SessionOptions so;
    if (threads > 0) {
      so.SetIntraOpNumThreads(threads);
      so.SetInterOpNumThreads(1);
    }
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    session_ = Ort::Session(env_, a.model_path.c_str(), so);
  }

  // Embeddings of `rows` (one batch), right-padded with pad_id: [rows, hidden] row-major.
  std::vector<float> run(const std::vector<const echo::Row*>& rows, int64_t pad_id,
                         int64_t& hidden) {
    const int64_t b = static_cast<int64_t>(rows.size());
    int64_t w = 1;
    for (auto* r : rows) w = std::max<int64_t>(w, static_cast<int64_t>(r->ids.size()));
    std::vector<int64_t> ids(b * w, pad_id), att(b * w, 0), pool(b * w, 0);
    for (int64_t i = 0; i < b; ++i) {
      const auto& r = *rows[i];
      std::copy(r.ids.begin(), r.ids.end(), ids.begin() + i * w);
      std::fill_n(att.begin() + i * w, r.ids.size(), 1);
      std::copy(r.pool.begin(), r.pool.end(), pool.begin() + i * w);
    }
    const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const int64_t shape[] = {b, w};
    Ort::Value inputs[] = {
        Ort::Value::CreateTensor<int64_t>(mem, ids.data(), ids.size(), shape, 2),
        Ort::Value::CreateTensor<int64_t>(mem, att.data(), att.size(), shape, 2),
        Ort::Value::CreateTensor<int64_t>(mem, pool.data(), pool.size(), shape, 2),
    };
    const char* in_names[] = {"input_ids", "attention_mask", "pool_mask"};
    const char* out_names[] = {output_name_.c_str()};
    auto out = session_.Run(Ort::RunOptions{nullptr}, in_names, inputs, 3, out_names, 1);
    const auto info = out[0].GetTensorTypeAndShapeInfo();
    const auto oshape = info.GetShape();
    if (oshape.size() != 2 || oshape[0] != b)
      throw std::runtime_error("the graph returned an unexpected output shape");
    hidden = oshape[1];
    const float* data = out[0].GetTensorData<float>();
    return {data, data + b * hidden};
  }

 private:
  Ort::Env env_;
  Ort::Session session_{nullptr};
  std::string output_name_;
};

// Embeddings of all rows, in input order: batches of rows sorted by length (longest first).
std::vector<std::vector<float>> embed(Model& model, const echo::PromptPlan& plan,
                                      const std::vector<echo::Row>& rows, const Options& o) {
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return rows[x].ids.size() > rows[y].ids.size(); });
  std::vector<std::vector<float>> out(rows.size());
  for (size_t start = 0; start < order.size(); start += o.batch_size) {
    const size_t stop = std::min(order.size(), start + o.batch_size);
    std::vector<const echo::Row*> batch;
    for (size_t k = start; k < stop; ++k) batch.push_back(&rows[order[k]]);
    int64_t hidden = 0;
    const auto emb = model.run(batch, plan.pad_id, hidden);
    for (size_t k = start; k < stop; ++k) {
      const float* v = emb.data() + (k - start) * hidden;
      std::vector<float> row(v, v + hidden);
      if (o.normalize) {
        float ss = 0.0f;
        for (float x : row) ss += x * x;
        const float norm = std::max(std::sqrt(ss), 1e-12f);
        for (float& x : row) x /= norm;
      }
      out[order[k]] = std::move(row);
    }
  }
  return out;
}

int run(const Options& o) {
  const Artifact a = open_artifact(o);
  const Tokenizer tok(a.tokenizer_path);
  const auto lines = read_texts();
  if (o.ids) {
    std::ostringstream s;
    for (const auto& r : encode_rows(a.plan, tok, lines))
      s << join(r.ids) << '\t' << join(r.pool) << '\t' << (r.truncated ? 1 : 0) << '\n';
    std::cout << s.str();
    return 0;
  }
  Model model(a, o.threads);
  std::vector<std::vector<float>> emb;
  double best = 1e300;
  for (int rep = 0; rep < o.repeat; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    emb = embed(model, a.plan, graph_rows(a, encode_rows(a.plan, tok, lines)), o);
    const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count());
  }
  if (o.repeat > 1)
    std::fprintf(stderr, "echoembed-cpp: %zu texts, batch %d, best of %d runs: %.1f ms\n",
                 lines.size(), o.batch_size, o.repeat, best);
  std::string buf;
  char num[32];
  for (const auto& row : emb) {
    for (size_t i = 0; i < row.size(); ++i) {
      std::snprintf(num, sizeof num, i ? " %.9g" : "%.9g", static_cast<double>(row[i]));
      buf += num;
    }
    buf += '\n';
  }
  std::fwrite(buf.data(), 1, buf.size(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UserError& e) {
    std::fprintf(stderr, "echoembed-cpp: error: %s\n", e.what());
    return 2;
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "echoembed-cpp: ONNX Runtime error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "echoembed-cpp: error: %s\n", e.what());
    return 1;
  }
}
