// One worker thread that runs tasks in submission order, for work a caller
// hands off and checks later: checkpoint writes, the outer-sync exchanges
// of DiLoCo / streaming, pipeline sends. The caller learns of a failure at
// drain() (or error()), which returns the first error; since later tasks
// usually depend on earlier ones (the next send of a stream, the next
// exchange of a fragment), tasks submitted after an error are skipped
// unless the queue was built with AfterError::kRun.
//
// Threads: the worker thread owns the task it is running and nothing else;
// the queue, the sticky error and the counters are guarded by one mutex.
// A task runs without that mutex held, so it may take as long as it likes
// and the caller may submit() meanwhile. Whatever a task touches must
// outlive the queue: an owner whose tasks use its members declares the
// queue after them (it is destroyed, and joined, first).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "archipelago/core/status.h"

namespace archipelago::core {

class BackgroundQueue {
 public:
  using Task = std::function<Status()>;
  // Called on the worker thread instead of a skipped task, with the sticky
  // error: for a caller waiting on that task in its own way.
  using Skipped = std::function<void(const Status&)>;

  enum class AfterError {
    kSkip,  // tasks not started when the first error occurs are skipped
    kRun,   // they still run (each independent: a later one may succeed)
  };

  explicit BackgroundQueue(AfterError after_error = AfterError::kSkip);
  // Runs or skips every task still queued, then joins the thread. Call
  // cancel() first to skip them instead.
  ~BackgroundQueue();
  BackgroundQueue(const BackgroundQueue&) = delete;
  BackgroundQueue& operator=(const BackgroundQueue&) = delete;

  // Returns at once; the task runs after every task submitted before it.
  void submit(Task task, Skipped on_skip = nullptr);

  // Blocks until every task submitted so far has run or been skipped;
  // returns the first error (sticky: every later drain() returns it too).
  Status drain();

  // The first error so far, without waiting.
  Status error() const;

  // Makes `why` the sticky error if there is none yet, so that tasks not
  // started are skipped (also with AfterError::kRun); the running task
  // finishes (its owner stops it through its own abort flag).
  void cancel(Status why);

 private:
  void loop();

  const AfterError after_error_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  struct Item {
    Task task;
    Skipped on_skip;
  };
  std::deque<Item> queue_;
  bool busy_ = false;      // a task is running (drain() waits for it)
  bool stop_ = false;      // the destructor: finish the queue, then leave
  bool cancelled_ = false; // cancel(): skip even with AfterError::kRun
  Status error_;
  std::thread thread_;     // last: starts after every other member is built
};

}  // namespace archipelago::core
