// Unit tests of the forker core, without Python. Run by ctest (and under ASan/UBSan in CI).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "forker.h"

using arpo::KVForker;

static int failures = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                \
    }                                                                            \
  } while (0)

template <typename E>
static bool throws(const std::function<void()>& fn, const std::string& needle = "") {
  try {
    fn();
  } catch (const E& e) {
    return needle.empty() || std::string(e.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

static void test_append_allocates_blocks() {
  KVForker f(8, 4);
  int64_t s = f.new_sequence();
  f.append(s, 5);
  CHECK(f.length(s) == 5);
  CHECK(f.block_table(s).size() == 2);
  CHECK(f.stats().free_blocks == 6);
  f.append(s, 3);
  CHECK(f.block_table(s).size() == 2);
  f.append(s, 1);
  CHECK(f.block_table(s).size() == 3);
  f.check_invariants();
}

static void test_fork_shares_without_copy() {
  KVForker f(16, 4);
  int64_t p = f.new_sequence();
  f.append(p, 8);  // two full blocks
  auto kids = f.fork(p, 3);
  CHECK(kids.size() == 3);
  for (int64_t k : kids) {
    CHECK(f.block_table(k) == f.block_table(p));
    CHECK(f.length(k) == 8);
  }
  CHECK(f.ref_count(f.block_table(p)[0]) == 4);
  CHECK(f.stats().used_blocks == 2);
  // Appending after a full shared block allocates a new block and copies nothing.
  f.append(kids[0], 1);
  CHECK(f.take_copies().empty());
  CHECK(f.stats().copies_made == 0);
  f.check_invariants();
}

static void test_copy_on_write_of_partial_tail() {
  KVForker f(16, 4);
  int64_t p = f.new_sequence();
  f.append(p, 6);  // tail block holds 2 of 4
  auto kids = f.fork(p, 2);
  const int32_t tail = f.block_table(p)[1];
  f.append(kids[0], 1);
  auto copies = f.take_copies();
  CHECK(copies.size() == 1);
  CHECK(copies[0].first == tail);
  CHECK(copies[0].second == f.block_table(kids[0])[1]);
  CHECK(f.block_table(kids[0])[0] == f.block_table(p)[0]);  // the full block stays shared
  CHECK(f.ref_count(tail) == 2);
  f.append(kids[1], 1);
  f.append(p, 1);  // the last holder writes in place
  CHECK(f.take_copies().size() == 1);
  CHECK(f.block_table(p)[1] == tail);
  CHECK(f.ref_count(tail) == 1);
  f.check_invariants();
}

static void test_fork_at_position() {
  KVForker f(16, 4);
  int64_t p = f.new_sequence();
  f.append(p, 10);
  auto kids = f.fork(p, 1, 5);
  CHECK(f.length(kids[0]) == 5);
  CHECK(f.block_table(kids[0]).size() == 2);
  CHECK(throws<std::invalid_argument>([&] { f.fork(p, 1, 11); }, "past the length"));
  f.check_invariants();
}

static void test_prepare_step_plan() {
  KVForker f(32, 4);
  int64_t a = f.new_sequence(), b = f.new_sequence();
  f.append(a, 3);
  auto kids = f.fork(a, 1);
  int64_t c = kids[0];
  int64_t seqs[3] = {a, b, c};
  int64_t toks[3] = {2, 5, 1};
  arpo::StepPlan plan;
  f.prepare_step(seqs, toks, 3, 0, plan);
  CHECK(plan.slot_mapping.size() == 8);
  CHECK(plan.context_lens == std::vector<int32_t>({5, 5, 4}));
  CHECK(plan.width == 2);
  CHECK(plan.block_tables.size() == 6);
  // a shared its partial tail with c: a copies first, c then holds the original alone.
  CHECK(plan.copies.size() == 2);
  const auto& ta = f.block_table(a);
  CHECK(plan.slot_mapping[0] == ta[0] * 4 + 3);
  CHECK(plan.slot_mapping[1] == ta[1] * 4 + 0);
  CHECK(plan.block_tables[0] == ta[0] && plan.block_tables[1] == ta[1]);
  CHECK(plan.block_tables[5] == 0);  // c has one block: padding
  f.check_invariants();
  arpo::StepPlan wide;
  int64_t one[1] = {b};
  int64_t zero[1] = {0};
  f.prepare_step(one, zero, 1, 7, wide);
  CHECK(wide.width == 7);
  CHECK(wide.slot_mapping.empty());
}

static void test_exhaustion_changes_nothing() {
  KVForker f(4, 4);
  int64_t a = f.new_sequence(), b = f.new_sequence();
  f.append(a, 8);
  CHECK(throws<arpo::PoolExhausted>([&] { f.append(b, 9); }, "needs 3 free blocks but only 2"));
  CHECK(f.length(b) == 0 && f.stats().free_blocks == 2);
  int64_t seqs[2] = {a, b};
  int64_t toks[2] = {4, 5};
  arpo::StepPlan plan;
  CHECK(throws<arpo::PoolExhausted>([&] { f.prepare_step(seqs, toks, 2, 0, plan); }));
  CHECK(f.length(a) == 8 && f.length(b) == 0);
  CHECK(f.stats().free_blocks == 2);
  f.check_invariants();
}

static void test_exact_budget_with_all_holders_writing() {
  // Two holders of one partial tail both write: one copy, not two, so one free block suffices.
  KVForker f(2, 4);
  int64_t a = f.new_sequence();
  f.append(a, 2);
  int64_t c = f.fork(a, 1)[0];
  int64_t seqs[2] = {a, c};
  int64_t toks[2] = {1, 1};
  arpo::StepPlan plan;
  f.prepare_step(seqs, toks, 2, 0, plan);
  CHECK(plan.copies.size() == 2);
  CHECK(f.stats().free_blocks == 0);
  f.check_invariants();
}

static void test_errors() {
  KVForker f(4, 4);
  int64_t a = f.new_sequence();
  CHECK(throws<arpo::UnknownSequence>([&] { f.append(7, 1); }, "never created"));
  CHECK(throws<std::invalid_argument>([&] { f.append(a, -1); }, "n must be >= 0"));
  CHECK(throws<std::invalid_argument>([&] { f.fork(a, -2); }));
  CHECK(throws<std::invalid_argument>([&] { f.truncate(a, 1); }, "outside"));
  f.free(a);
  CHECK(throws<arpo::UnknownSequence>([&] { f.length(a); }, "already freed"));
  CHECK(throws<arpo::UnknownSequence>([&] { f.free(a); }));
  CHECK(throws<std::invalid_argument>([] { KVForker bad(4, 12); }, "power of two"));
  CHECK(throws<std::invalid_argument>([] { KVForker bad(0, 16); }));
  int64_t b = f.new_sequence();
  int64_t seqs[2] = {b, b};
  int64_t toks[2] = {1, 1};
  arpo::StepPlan plan;
  CHECK(throws<std::invalid_argument>([&] { f.prepare_step(seqs, toks, 2, 0, plan); }, "twice"));
  CHECK(f.length(b) == 0);
  f.check_invariants();
}

static void test_truncate_and_free_release_everything() {
  KVForker f(16, 4);
  int64_t a = f.new_sequence();
  f.append(a, 13);
  auto kids = f.fork(a, 2, 9);
  f.truncate(a, 3);
  CHECK(f.block_table(a).size() == 1);
  f.append(kids[0], 4);
  f.free(a);
  for (int64_t k : kids) f.free(k);
  CHECK(f.stats().free_blocks == 16);
  CHECK(f.stats().live_sequences == 0);
  f.check_invariants();
}

static void test_pending_copy_dropped_when_dst_freed() {
  KVForker f(8, 4);
  int64_t a = f.new_sequence();
  f.append(a, 2);
  int64_t c = f.fork(a, 1)[0];
  f.append(c, 1);
  CHECK(f.pending_copies() == 1);
  f.free(c);
  CHECK(f.pending_copies() == 0);
  f.check_invariants();
}

static void test_random_operations_keep_invariants() {
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 20; ++trial) {
    KVForker f(64, 1 << (trial % 4));
    std::vector<int64_t> live;
    for (int op = 0; op < 400; ++op) {
      const int kind = static_cast<int>(rng() % 5);
      try {
        if (kind == 0 || live.empty()) {
          live.push_back(f.new_sequence());
        } else {
          int64_t s = live[rng() % live.size()];
          if (kind == 1) {
            f.append(s, static_cast<int64_t>(rng() % 9));
          } else if (kind == 2) {
            const int64_t at = static_cast<int64_t>(rng() % (f.length(s) + 1));
            for (int64_t k : f.fork(s, static_cast<int64_t>(rng() % 3), at)) live.push_back(k);
          } else if (kind == 3) {
            f.truncate(s, static_cast<int64_t>(rng() % (f.length(s) + 1)));
          } else {
            f.free(s);
            live.erase(std::find(live.begin(), live.end(), s));
          }
        }
      } catch (const arpo::PoolExhausted&) {
      }
      f.check_invariants();
      if (op % 7 == 0) f.take_copies();
    }
    for (int64_t s : live) f.free(s);
    CHECK(f.stats().free_blocks == 64);
    f.check_invariants();
  }
}

int main() {
  test_append_allocates_blocks();
  test_fork_shares_without_copy();
  test_copy_on_write_of_partial_tail();
  test_fork_at_position();
  test_prepare_step_plan();
  test_exhaustion_changes_nothing();
  test_exact_budget_with_all_holders_writing();
  test_errors();
  test_truncate_and_free_release_everything();
  test_pending_copy_dropped_when_dst_freed();
  test_random_operations_keep_invariants();
  if (failures) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  std::printf("forker_tests: all checks passed\n");
  return 0;
}
