// Input texts as echoembed reads them: UTF-8, split like Python's str.splitlines(), a text must
// hold a character that is not whitespace in Python's sense (str.isspace()).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace echo {

struct CodePoint {
  uint32_t value;
  size_t begin;  // byte offsets in the source
  size_t end;
};

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), as Python decodes it.
inline std::vector<CodePoint> decode_utf8(const std::string& s) {
  std::vector<CodePoint> out;
  out.reserve(s.size());
  size_t i = 0;
  auto bad = [&](size_t at) {
    return std::runtime_error("input is not valid UTF-8 (byte offset " + std::to_string(at) +
                              "); decode it as UTF-8 first");
  };
  while (i < s.size()) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    uint32_t cp = 0;
    size_t n = 0;
    if (b0 < 0x80) {
      cp = b0, n = 1;
    } else if (b0 >= 0xC2 && b0 <= 0xDF) {
      cp = b0 & 0x1F, n = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      cp = b0 & 0x0F, n = 3;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      cp = b0 & 0x07, n = 4;
    } else {
      throw bad(i);
    }
    if (i + n > s.size()) throw bad(i);
    for (size_t k = 1; k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) throw bad(i);
      cp = (cp << 6) | (b & 0x3F);
    }
    const bool overlong = (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) throw bad(i);
    out.push_back({cp, i, i + n});
    i += n;
  }
  return out;
}

// The line boundaries of str.splitlines().
inline bool is_line_break(uint32_t c) {
  return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
         c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
}

// str.isspace() for one code point.
inline bool is_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

struct Line {
  std::string text;
  bool blank;    // empty or whitespace only
  bool has_nul;  // holds U+0000, which the tokenizer's C strings cannot carry
};

// str.splitlines() of the whole input (no empty last line after a final line break).
inline std::vector<Line> split_lines(const std::string& data) {
  const auto cps = decode_utf8(data);
  std::vector<Line> lines;
  size_t start = 0;  // byte offset of the current line
  bool blank = true, nul = false;
  for (size_t k = 0; k < cps.size(); ++k) {
    const auto& c = cps[k];
    if (is_line_break(c.value)) {
      lines.push_back({data.substr(start, c.begin - start), blank, nul});
      size_t next = c.end;
      if (c.value == '\r' && k + 1 < cps.size() && cps[k + 1].value == '\n') next = cps[++k].end;
      start = next;
      blank = true, nul = false;
      continue;
    }
    if (!is_space(c.value)) blank = false;
    if (c.value == 0) nul = true;
  }
  if (start < data.size()) lines.push_back({data.substr(start), blank, nul});
  return lines;
}

}  // namespace echo
