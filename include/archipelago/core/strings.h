// Small text helpers with one rule each, shared by the config loader (env
// and --set list values) and the CLI (--sizes, --ops, --impls).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace archipelago::core {

// `s` without leading and trailing white space.
std::string trim(std::string_view s);

// Items of a list written as "[a, b, c]" or "a,b,c": one pair of enclosing
// brackets is dropped, items are split at commas and trimmed. A blank text
// (or "[]") is the empty list; a trailing comma adds no item; an empty item
// inside ("a,,b") is kept as "" so the caller's check of each item rejects
// it and names the field, instead of silently reading a typo.
std::vector<std::string> splitList(std::string_view text);

}  // namespace archipelago::core
