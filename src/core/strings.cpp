#include "archipelago/core/strings.h"

#include <cctype>

namespace archipelago::core {

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

std::vector<std::string> splitList(std::string_view text) {
  std::string t = trim(text);
  if (t.size() >= 2 && t.front() == '[' && t.back() == ']') t = t.substr(1, t.size() - 2);
  std::vector<std::string> out;
  if (trim(t).empty()) return out;
  size_t start = 0;
  while (start <= t.size()) {
    const size_t comma = t.find(',', start);
    const size_t end = comma == std::string::npos ? t.size() : comma;
    // The text after a trailing comma is no item (as std::getline splits).
    if (comma == std::string::npos && start == t.size()) break;
    out.push_back(trim(std::string_view(t).substr(start, end - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace archipelago::core
