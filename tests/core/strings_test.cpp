// core/strings.h: list values of env, --set and CLI flags (--sizes, --ops).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "archipelago/core/strings.h"

namespace archipelago::core {
namespace {

using Items = std::vector<std::string>;

TEST(Strings, SplitList) {
  EXPECT_EQ(splitList("1,2,3"), (Items{"1", "2", "3"}));
  EXPECT_EQ(splitList(" [1, 2 ,3] "), (Items{"1", "2", "3"}));
  EXPECT_EQ(splitList("4KB,1MB,"), (Items{"4KB", "1MB"}));  // trailing comma: no item
  EXPECT_EQ(splitList("a,,b"), (Items{"a", "", "b"}));      // a typo stays visible to the caller
  EXPECT_EQ(splitList("allreduce"), (Items{"allreduce"}));
  EXPECT_TRUE(splitList("").empty());
  EXPECT_TRUE(splitList("  ").empty());
  EXPECT_TRUE(splitList("[ ]").empty());
  EXPECT_EQ(splitList("[a]b]"), (Items{"a]b"}));  // one enclosing pair only
  EXPECT_EQ(trim("\t x y \n"), "x y");
  EXPECT_EQ(trim("   "), "");
}

}  // namespace
}  // namespace archipelago::core
