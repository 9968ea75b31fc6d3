// Paged KV block tables with reference counts: the integer half of the KV cache.
//
// A pool of `num_blocks` blocks of `block_size` token slots. Each sequence owns a block table (the
// blocks holding its tokens in order). Forking copies a table and adds one reference per block, so
// a branch shares its prefix's KV and nothing is copied. The first write into a block that another
// sequence also holds (the partial last block after a fork) moves the writer to a fresh block and
// records a (src, dst) copy pair that the caller executes on the KV tensors before the step's
// writes. Full shared blocks are never copied.
//
// Every mutating call checks its arguments and the free-block budget before changing anything, so
// a failed call leaves all state exactly as it was.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace arpo {

// Thrown when the pool cannot satisfy a request; the message says needed vs free.
struct PoolExhausted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown for a sequence id that was never created or has been freed.
struct UnknownSequence : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown by check_invariants(): the bookkeeping is inconsistent (a bug, never a user error).
struct InvariantViolation : std::logic_error {
  using std::logic_error::logic_error;
};

struct ForkerStats {
  int64_t free_blocks;
  int64_t used_blocks;
  int64_t shared_blocks;
  int64_t copies_made;
  int64_t live_sequences;
};

// Everything one engine step needs, in flat row-major buffers.
struct StepPlan {
  std::vector<int64_t> slot_mapping;   // one slot per new token, batch order
  std::vector<int32_t> block_tables;   // [batch, width], padded with 0
  std::vector<int32_t> context_lens;   // [batch], lengths after the step's tokens
  std::vector<int32_t> copies;         // [k, 2] (src, dst) pairs to run before the writes
  int64_t width = 0;
};

class KVForker {
 public:
  KVForker(int64_t num_blocks, int64_t block_size);

  int64_t new_sequence();
  void append(int64_t seq, int64_t n);
  std::vector<int64_t> fork(int64_t seq, int64_t n, int64_t at = -1);
  void truncate(int64_t seq, int64_t length);
  void free(int64_t seq);

  int64_t length(int64_t seq) const;
  const std::vector<int32_t>& block_table(int64_t seq) const;
  bool alive(int64_t seq) const;

  // Appends new_tokens[i] slots to seqs[i] (all or nothing) and fills `plan`.
  // `min_width` pads the block tables to at least that many columns (fixed shapes for CUDA graphs).
  void prepare_step(const int64_t* seqs, const int64_t* new_tokens, int64_t batch, int64_t min_width,
                    StepPlan& plan);

  // Copy pairs recorded since the last drain, then forgets them.
  std::vector<std::pair<int32_t, int32_t>> take_copies();
  int64_t pending_copies() const { return static_cast<int64_t>(pending_.size()); }

  // Throws InvariantViolation naming the first broken invariant.
  void check_invariants() const;
  ForkerStats stats() const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int32_t ref_count(int32_t block) const;

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t length = 0;
    bool alive = false;
    mutable uint64_t stamp = 0;  // last prepare_step that listed it: finds duplicates in O(1)
  };

  Sequence& live(int64_t seq);
  const Sequence& live(int64_t seq) const;
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  bool tail_is_partial(const Sequence& s) const { return s.length % block_size_ != 0; }
  int32_t allocate();
  void release(int32_t block);
  void grow(Sequence& s, int64_t n);  // caller has checked the budget
  [[noreturn]] void exhausted(int64_t needed, const std::string& what) const;
  // prepare_step's halves: checks and the count of blocks the step needs (marks the batch's
  // sequences, changes nothing else), then the step itself, which fills the plan.
  int64_t step_blocks_needed(const int64_t* seqs, const int64_t* new_tokens, int64_t batch, int64_t& total_tokens);
  int64_t copies_needed(std::vector<int32_t>& shared_tails) const;  // sorts shared_tails
  void apply_step(const int64_t* seqs, const int64_t* new_tokens, int64_t batch, int64_t min_width,
                  int64_t total_tokens, StepPlan& plan);

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // a stack: the next block handed out is free_.back()
  std::vector<Sequence> seqs_;
  std::vector<std::pair<int32_t, int32_t>> pending_;
  int64_t copies_made_ = 0;
  int64_t live_count_ = 0;
  uint64_t step_stamp_ = 0;
};

}  // namespace arpo
