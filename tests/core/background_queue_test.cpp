// core::BackgroundQueue: FIFO on one thread, first error sticky, later tasks
// skipped (or run with AfterError::kRun), drain waits for the running task.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "archipelago/core/background_queue.h"

namespace archipelago::core {
namespace {

TEST(BackgroundQueue, RunsInOrderOnOneThreadAndDrainWaits) {
  BackgroundQueue q;
  std::vector<int> order;  // written by the worker only; read after drain()
  std::thread::id worker;
  std::atomic<int> threads_seen{0};
  for (int i = 0; i < 50; ++i) {
    q.submit([&, i] {
      if (i == 0) {
        worker = std::this_thread::get_id();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // drain() must wait for a running task
      } else if (std::this_thread::get_id() != worker) {
        ++threads_seen;
      }
      order.push_back(i);
      return okStatus();
    });
  }
  ASSERT_TRUE(q.drain().isOk());
  ASSERT_EQ(order.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
  EXPECT_EQ(threads_seen.load(), 0);
  EXPECT_NE(worker, std::this_thread::get_id());
}

TEST(BackgroundQueue, FirstErrorIsStickyAndLaterTasksAreSkipped) {
  BackgroundQueue q;
  std::vector<int> ran;
  std::vector<Status> skipped_with;
  q.submit([&] { ran.push_back(0); return okStatus(); });
  q.submit([&] { ran.push_back(1); return unavailable("send to rank 3: peer closed"); });
  q.submit([&] { ran.push_back(2); return internalError("must not run"); },
           [&](const Status& why) { skipped_with.push_back(why); });
  q.submit([&] { ran.push_back(3); return okStatus(); });
  Status st = q.drain();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_EQ(st.message(), "send to rank 3: peer closed");
  EXPECT_EQ(ran, (std::vector<int>{0, 1}));
  ASSERT_EQ(skipped_with.size(), 1u);
  EXPECT_EQ(skipped_with[0].message(), st.message());
  // Still sticky: a later drain, and error(), return the same first error.
  q.submit([&] { ran.push_back(4); return okStatus(); });
  EXPECT_EQ(q.drain().message(), st.message());
  EXPECT_EQ(q.error().message(), st.message());
  EXPECT_EQ(ran.size(), 2u);
}

TEST(BackgroundQueue, AfterErrorRunKeepsRunningAndKeepsTheFirstError) {
  BackgroundQueue q(BackgroundQueue::AfterError::kRun);
  std::vector<int> ran;
  q.submit([&] { ran.push_back(0); return resourceExhausted("step 50: disk full"); });
  q.submit([&] { ran.push_back(1); return okStatus(); });
  q.submit([&] { ran.push_back(2); return dataLoss("step 150: second error"); });
  Status st = q.drain();
  EXPECT_EQ(ran, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
}

TEST(BackgroundQueue, DestructorRunsWhatIsQueued) {
  std::atomic<int> ran{0};
  {
    BackgroundQueue q;
    for (int i = 0; i < 10; ++i) {
      q.submit([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        ++ran;
        return okStatus();
      });
    }
  }
  EXPECT_EQ(ran.load(), 10);
}

TEST(BackgroundQueue, CancelSkipsTasksNotStarted) {
  std::atomic<bool> release{false};
  std::atomic<bool> started{false};
  std::atomic<int> ran{0}, skipped{0};
  Status seen;
  std::mutex mu;
  {
    BackgroundQueue q(BackgroundQueue::AfterError::kRun);  // cancel() skips even here
    q.submit([&] {
      started = true;
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ++ran;
      return okStatus();
    });
    for (int i = 0; i < 5; ++i) {
      q.submit([&] { ++ran; return okStatus(); }, [&](const Status& why) {
        std::lock_guard<std::mutex> lock(mu);
        seen = why;
        ++skipped;
      });
    }
    while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    q.cancel(aborted("outer sync closed"));
    EXPECT_EQ(q.error().code(), StatusCode::kAborted);
    release = true;
  }
  EXPECT_EQ(ran.load(), 1);  // the running task finished; the rest were skipped
  EXPECT_EQ(skipped.load(), 5);
  EXPECT_EQ(seen.message(), "outer sync closed");
}

TEST(BackgroundQueue, ReleasesWhatATaskHoldsOnceItRan) {
  // A pipeline send keeps its tensor alive until sent, and no longer.
  BackgroundQueue q;
  auto payload = std::make_shared<std::vector<float>>(1024, 1.0f);
  std::weak_ptr<std::vector<float>> watch = payload;
  q.submit([p = std::move(payload)] { return p->size() == 1024 ? okStatus() : internalError("payload"); });
  ASSERT_TRUE(q.drain().isOk());
  EXPECT_TRUE(watch.expired());
}

}  // namespace
}  // namespace archipelago::core
