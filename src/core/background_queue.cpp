#include "archipelago/core/background_queue.h"

#include <utility>

namespace archipelago::core {

BackgroundQueue::BackgroundQueue(AfterError after_error)
    : after_error_(after_error), thread_([this] { loop(); }) {}

BackgroundQueue::~BackgroundQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void BackgroundQueue::submit(Task task, Skipped on_skip) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({std::move(task), std::move(on_skip)});
  }
  cv_.notify_all();
}

Status BackgroundQueue::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return queue_.empty() && !busy_; });
  return error_;
}

Status BackgroundQueue::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void BackgroundQueue::cancel(Status why) {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  if (error_.isOk()) error_ = why.isOk() ? aborted("background queue cancelled") : std::move(why);
}

void BackgroundQueue::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and nothing is left
    Item item = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    const bool skip = !error_.isOk() && (after_error_ == AfterError::kSkip || cancelled_);
    const Status sticky = error_;
    lock.unlock();
    Status st;
    if (!skip) {
      st = item.task();
    } else if (item.on_skip) {
      item.on_skip(sticky);
    }
    item = Item{};  // release what the task captured before the caller hears it is done
    lock.lock();
    if (!st.isOk() && error_.isOk()) error_ = std::move(st);
    busy_ = false;
    cv_.notify_all();
  }
}

}  // namespace archipelago::core
