#include "forker.h"

#include <algorithm>
#include <sstream>

namespace arpo {

namespace {

std::invalid_argument bad(const std::string& msg) { return std::invalid_argument(msg); }

}  // namespace

KVForker::KVForker(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw bad("num_blocks must be in [1, 2^31-1], got " + std::to_string(num_blocks));
  }
  if (block_size <= 0 || (block_size & (block_size - 1)) != 0) {
    throw bad("block_size must be a positive power of two, got " + std::to_string(block_size));
  }
  ref_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Stack order: block 0 is handed out first.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

KVForker::Sequence& KVForker::live(int64_t seq) {
  return const_cast<Sequence&>(static_cast<const KVForker*>(this)->live(seq));
}

const KVForker::Sequence& KVForker::live(int64_t seq) const {
  if (seq < 0 || seq >= static_cast<int64_t>(seqs_.size())) {
    throw UnknownSequence("unknown sequence id " + std::to_string(seq) + " (never created)");
  }
  const Sequence& s = seqs_[static_cast<size_t>(seq)];
  if (!s.alive) throw UnknownSequence("unknown sequence id " + std::to_string(seq) + " (already freed)");
  return s;
}

bool KVForker::alive(int64_t seq) const {
  return seq >= 0 && seq < static_cast<int64_t>(seqs_.size()) && seqs_[static_cast<size_t>(seq)].alive;
}

int32_t KVForker::ref_count(int32_t block) const {
  if (block < 0 || block >= num_blocks_) throw bad("block id out of range: " + std::to_string(block));
  return ref_[static_cast<size_t>(block)];
}

void KVForker::exhausted(int64_t needed, const std::string& what) const {
  std::ostringstream msg;
  msg << "KV pool exhausted: " << what << " needs " << needed << " free blocks but only " << free_.size()
      << " of " << num_blocks_ << " are free (block_size " << block_size_
      << "); nothing was changed. Free finished sequences or give the pool more blocks.";
  throw PoolExhausted(msg.str());
}

int32_t KVForker::allocate() {
  int32_t b = free_.back();
  free_.pop_back();
  ref_[static_cast<size_t>(b)] = 1;
  return b;
}

void KVForker::release(int32_t block) {
  if (--ref_[static_cast<size_t>(block)] > 0) return;
  free_.push_back(block);
  // A pending copy into a block nobody holds any more must not run after the block is reused.
  if (!pending_.empty()) {
    pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                  [block](const std::pair<int32_t, int32_t>& p) { return p.second == block; }),
                   pending_.end());
  }
}

void KVForker::grow(Sequence& s, int64_t n) {
  if (n == 0) return;
  if (tail_is_partial(s) && ref_[static_cast<size_t>(s.blocks.back())] > 1) {
    int32_t src = s.blocks.back();
    int32_t dst = allocate();
    --ref_[static_cast<size_t>(src)];  // still >= 1: another sequence holds it
    s.blocks.back() = dst;
    pending_.emplace_back(src, dst);
    ++copies_made_;
  }
  s.length += n;
  const size_t want = static_cast<size_t>(blocks_for(s.length));
  while (s.blocks.size() < want) s.blocks.push_back(allocate());
}

int64_t KVForker::new_sequence() {
  Sequence s;
  s.alive = true;
  seqs_.push_back(std::move(s));
  ++live_count_;
  return static_cast<int64_t>(seqs_.size()) - 1;
}

void KVForker::append(int64_t seq, int64_t n) {
  Sequence& s = live(seq);
  if (n < 0) throw bad("append: n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  int64_t needed = blocks_for(s.length + n) - static_cast<int64_t>(s.blocks.size());
  if (tail_is_partial(s) && ref_[static_cast<size_t>(s.blocks.back())] > 1) ++needed;
  if (needed > static_cast<int64_t>(free_.size())) {
    exhausted(needed, "appending " + std::to_string(n) + " tokens to sequence " + std::to_string(seq));
  }
  grow(s, n);
}

std::vector<int64_t> KVForker::fork(int64_t seq, int64_t n, int64_t at) {
  const int64_t parent_length = live(seq).length;
  if (n < 0) throw bad("fork: n must be >= 0, got " + std::to_string(n));
  if (at < 0) at = parent_length;
  if (at > parent_length) {
    throw bad("fork: at=" + std::to_string(at) + " is past the length " + std::to_string(parent_length) +
              " of sequence " + std::to_string(seq));
  }
  const size_t shared = static_cast<size_t>(blocks_for(at));
  std::vector<int64_t> children;
  children.reserve(static_cast<size_t>(n));
  seqs_.reserve(seqs_.size() + static_cast<size_t>(n));  // no reallocation while `parent` is in use
  const Sequence& parent = seqs_[static_cast<size_t>(seq)];
  for (int64_t i = 0; i < n; ++i) {
    Sequence child;
    child.alive = true;
    child.length = at;
    child.blocks.assign(parent.blocks.begin(), parent.blocks.begin() + static_cast<std::ptrdiff_t>(shared));
    for (int32_t b : child.blocks) ++ref_[static_cast<size_t>(b)];
    seqs_.push_back(std::move(child));
    ++live_count_;
    children.push_back(static_cast<int64_t>(seqs_.size()) - 1);
  }
  return children;
}

void KVForker::truncate(int64_t seq, int64_t length) {
  Sequence& s = live(seq);
  if (length < 0 || length > s.length) {
    throw bad("truncate: length " + std::to_string(length) + " is outside [0, " + std::to_string(s.length) +
              "] for sequence " + std::to_string(seq));
  }
  const size_t keep = static_cast<size_t>(blocks_for(length));
  while (s.blocks.size() > keep) {
    int32_t b = s.blocks.back();
    s.blocks.pop_back();
    release(b);
  }
  s.length = length;
}

void KVForker::free(int64_t seq) {
  Sequence& s = live(seq);
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) release(*it);
  s.blocks.clear();
  s.blocks.shrink_to_fit();
  s.length = 0;
  s.alive = false;
  --live_count_;
}

int64_t KVForker::length(int64_t seq) const { return live(seq).length; }

const std::vector<int32_t>& KVForker::block_table(int64_t seq) const { return live(seq).blocks; }

std::vector<std::pair<int32_t, int32_t>> KVForker::take_copies() {
  std::vector<std::pair<int32_t, int32_t>> out;
  out.swap(pending_);
  return out;
}

void KVForker::prepare_step(const int64_t* seqs, const int64_t* new_tokens, int64_t batch, int64_t min_width,
                            StepPlan& plan) {
  if (batch < 0) throw bad("prepare_step: negative batch size");
  // 1. Validate everything and count the blocks needed before touching any state.
  int64_t total_tokens = 0;
  const int64_t needed = step_blocks_needed(seqs, new_tokens, batch, total_tokens);
  if (needed > static_cast<int64_t>(free_.size())) {
    exhausted(needed, "a step of " + std::to_string(batch) + " sequences and " + std::to_string(total_tokens) +
                          " new tokens");
  }
  // 2. Apply and emit the plan.
  apply_step(seqs, new_tokens, batch, min_width, total_tokens, plan);
}

int64_t KVForker::step_blocks_needed(const int64_t* seqs, const int64_t* new_tokens, int64_t batch,
                                     int64_t& total_tokens) {
  int64_t needed = 0;
  std::vector<int32_t> shared_tails;
  const uint64_t stamp = ++step_stamp_;
  for (int64_t i = 0; i < batch; ++i) {
    const Sequence& s = live(seqs[i]);
    const int64_t n = new_tokens[i];
    if (n < 0) {
      throw bad("prepare_step: new_tokens[" + std::to_string(i) + "] = " + std::to_string(n) + " is negative");
    }
    if (s.stamp == stamp) {
      throw bad("prepare_step: sequence " + std::to_string(seqs[i]) + " appears twice in the batch");
    }
    s.stamp = stamp;
    needed += blocks_for(s.length + n) - static_cast<int64_t>(s.blocks.size());
    total_tokens += n;
    if (n > 0 && tail_is_partial(s) && ref_[static_cast<size_t>(s.blocks.back())] > 1) {
      shared_tails.push_back(s.blocks.back());
    }
  }
  return needed + copies_needed(shared_tails);
}

int64_t KVForker::copies_needed(std::vector<int32_t>& shared_tails) const {
  // A shared tail block written by c of its r holders costs c copies, or c - 1 when every holder
  // writes (the last writer keeps the original).
  std::sort(shared_tails.begin(), shared_tails.end());
  int64_t needed = 0;
  for (size_t i = 0; i < shared_tails.size();) {
    size_t j = i;
    while (j < shared_tails.size() && shared_tails[j] == shared_tails[i]) ++j;
    const int64_t c = static_cast<int64_t>(j - i);
    needed += c - (c == ref_[static_cast<size_t>(shared_tails[i])] ? 1 : 0);
    i = j;
  }
  return needed;
}

void KVForker::apply_step(const int64_t* seqs, const int64_t* new_tokens, int64_t batch, int64_t min_width,
                          int64_t total_tokens, StepPlan& plan) {
  plan.slot_mapping.resize(static_cast<size_t>(total_tokens));
  plan.context_lens.resize(static_cast<size_t>(batch));
  int64_t width = std::max<int64_t>(min_width, 0), pos = 0;
  for (int64_t i = 0; i < batch; ++i) {
    Sequence& s = seqs_[static_cast<size_t>(seqs[i])];
    const int64_t start = s.length, n = new_tokens[i];
    grow(s, n);
    for (int64_t p = start; p < start + n; ++p) {
      plan.slot_mapping[static_cast<size_t>(pos++)] =
          static_cast<int64_t>(s.blocks[static_cast<size_t>(p / block_size_)]) * block_size_ + p % block_size_;
    }
    plan.context_lens[static_cast<size_t>(i)] = static_cast<int32_t>(s.length);
    width = std::max<int64_t>(width, static_cast<int64_t>(s.blocks.size()));
  }
  plan.width = width;
  plan.block_tables.assign(static_cast<size_t>(batch * width), 0);
  for (int64_t i = 0; i < batch; ++i) {
    const auto& blocks = seqs_[static_cast<size_t>(seqs[i])].blocks;
    std::copy(blocks.begin(), blocks.end(), plan.block_tables.begin() + i * width);
  }
  plan.copies.clear();
  for (const auto& p : pending_) {
    plan.copies.push_back(p.first);
    plan.copies.push_back(p.second);
  }
  pending_.clear();
}

void KVForker::check_invariants() const {
  std::vector<int32_t> counted(static_cast<size_t>(num_blocks_), 0);
  int64_t live_seen = 0;
  for (size_t id = 0; id < seqs_.size(); ++id) {
    const Sequence& s = seqs_[id];
    if (!s.alive) {
      if (!s.blocks.empty()) throw InvariantViolation("freed sequence " + std::to_string(id) + " still holds blocks");
      continue;
    }
    ++live_seen;
    if (static_cast<int64_t>(s.blocks.size()) != blocks_for(s.length)) {
      throw InvariantViolation("sequence " + std::to_string(id) + " has " + std::to_string(s.blocks.size()) +
                             " blocks for length " + std::to_string(s.length));
    }
    for (int32_t b : s.blocks) {
      if (b < 0 || b >= num_blocks_) throw InvariantViolation("block id out of range in a table");
      ++counted[static_cast<size_t>(b)];
    }
  }
  if (live_seen != live_count_) throw InvariantViolation("live sequence count is off");
  std::vector<char> in_free(static_cast<size_t>(num_blocks_), 0);
  for (int32_t b : free_) {
    if (in_free[static_cast<size_t>(b)]) throw InvariantViolation("block " + std::to_string(b) + " is free twice");
    in_free[static_cast<size_t>(b)] = 1;
  }
  for (int64_t b = 0; b < num_blocks_; ++b) {
    const size_t i = static_cast<size_t>(b);
    if (counted[i] != ref_[i]) {
      throw InvariantViolation("block " + std::to_string(b) + " has reference count " + std::to_string(ref_[i]) +
                             " but " + std::to_string(counted[i]) + " tables hold it");
    }
    if ((ref_[i] == 0) != static_cast<bool>(in_free[i])) {
      throw InvariantViolation("block " + std::to_string(b) + " is " + (in_free[i] ? "free but held" : "unheld but not free"));
    }
  }
  for (const auto& p : pending_) {
    if (ref_[static_cast<size_t>(p.second)] == 0) throw InvariantViolation("a pending copy targets a free block");
  }
}

ForkerStats KVForker::stats() const {
  ForkerStats st{};
  st.free_blocks = static_cast<int64_t>(free_.size());
  st.used_blocks = num_blocks_ - st.free_blocks;
  st.shared_blocks = std::count_if(ref_.begin(), ref_.end(), [](int32_t r) { return r > 1; });
  st.copies_made = copies_made_;
  st.live_sequences = live_count_;
  return st;
}

}  // namespace arpo
