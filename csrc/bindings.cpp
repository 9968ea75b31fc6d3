// Python bindings of the forker: arpo_fast._C.KVForker.
//
// Arrays cross the boundary as numpy arrays: inputs are read in place (int64, C order), outputs are
// std::vectors handed to numpy without a copy (a capsule owns them).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "forker.h"

namespace py = pybind11;
using arpo::KVForker;

namespace {

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), owner);
}

using IntArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

IntArray as_1d(const py::handle& obj, const char* name) {
  IntArray arr = IntArray::ensure(obj);
  if (!arr) throw std::invalid_argument(std::string(name) + " must be a sequence of integers");
  if (arr.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be one-dimensional");
  return arr;
}

py::object step_metadata_type() {
  static py::object cls = py::module_::import("arpo_fast.step_metadata").attr("StepMetadata");
  return cls;
}

py::object prepare_step(KVForker& f, const py::handle& seqs_obj, const py::handle& tokens_obj, int64_t min_width) {
  IntArray seqs = as_1d(seqs_obj, "seqs");
  IntArray tokens = as_1d(tokens_obj, "new_tokens");
  if (seqs.shape(0) != tokens.shape(0)) {
    throw std::invalid_argument("prepare_step: seqs has " + std::to_string(seqs.shape(0)) + " entries but new_tokens has " +
                                std::to_string(tokens.shape(0)));
  }
  const int64_t batch = seqs.shape(0);
  arpo::StepPlan plan;
  f.prepare_step(seqs.data(), tokens.data(), batch, min_width, plan);
  const auto total = static_cast<py::ssize_t>(plan.slot_mapping.size());
  const auto k = static_cast<py::ssize_t>(plan.copies.size() / 2);
  return step_metadata_type()(to_numpy(std::move(plan.slot_mapping), {total}),
                              to_numpy(std::move(plan.block_tables), {batch, static_cast<py::ssize_t>(plan.width)}),
                              to_numpy(std::move(plan.context_lens), {batch}),
                              to_numpy(std::move(plan.copies), {k, 2}));
}

py::array_t<int32_t> pairs_to_numpy(const std::vector<std::pair<int32_t, int32_t>>& pairs) {
  std::vector<int32_t> flat;
  flat.reserve(pairs.size() * 2);
  for (const auto& p : pairs) {
    flat.push_back(p.first);
    flat.push_back(p.second);
  }
  return to_numpy(std::move(flat), {static_cast<py::ssize_t>(pairs.size()), 2});
}

void register_errors(py::module_& m) {
  py::object errors = py::module_::import("arpo_fast.errors");
  static py::handle pool_exhausted = py::object(errors.attr("PoolExhaustedError")).release();
  static py::handle unknown_sequence = py::object(errors.attr("UnknownSequenceError")).release();
  m.attr("PoolExhaustedError") = pool_exhausted;
  m.attr("UnknownSequenceError") = unknown_sequence;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const arpo::PoolExhausted& e) {
      PyErr_SetString(pool_exhausted.ptr(), e.what());
    } catch (const arpo::UnknownSequence& e) {
      PyErr_SetString(unknown_sequence.ptr(), e.what());
    } catch (const arpo::InvariantViolation& e) {
      PyErr_SetString(PyExc_AssertionError, e.what());
    }
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "arpo_fast native core: paged KV block tables with reference counts (the KV-cache forker).";
  m.attr("__version__") = ARPO_VERSION;
  register_errors(m);

  py::class_<KVForker>(m, "KVForker", R"doc(
Paged KV block tables with reference counts.

KVForker(num_blocks, block_size=16): a pool of num_blocks blocks of block_size token slots
(a power of two). Sequences are integer ids. fork() shares blocks by reference count (no KV copy);
the first write into a shared partial block records a (src, dst) copy pair, returned by the next
prepare_step() (or take_copies()) and to be executed on the KV tensors before that step's writes.
A call that fails changes nothing.)doc")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size") = 16)
      .def_property_readonly("num_blocks", &KVForker::num_blocks)
      .def_property_readonly("block_size", &KVForker::block_size)
      .def("new_sequence", &KVForker::new_sequence, "Create an empty sequence and return its id.")
      .def("append", &KVForker::append, py::arg("seq"), py::arg("n"),
           "Reserve slots for n more tokens of seq, allocating blocks (and copy-on-write) as needed.")
      .def("fork", &KVForker::fork, py::arg("seq"), py::arg("n"), py::arg("at") = -1,
           "Make n children sharing seq's blocks up to position `at` (default: its length); returns their ids.")
      .def("truncate", &KVForker::truncate, py::arg("seq"), py::arg("length"),
           "Shorten seq to `length` tokens, releasing blocks past it.")
      .def("free", &KVForker::free, py::arg("seq"), "Release every block of seq; its id becomes invalid.")
      .def("length", &KVForker::length, py::arg("seq"))
      .def("alive", &KVForker::alive, py::arg("seq"))
      .def(
          "block_table", [](const KVForker& f, int64_t seq) {
            std::vector<int32_t> copy = f.block_table(seq);
            const auto n = static_cast<py::ssize_t>(copy.size());
            return to_numpy(std::move(copy), {n});
          },
          py::arg("seq"), "The blocks holding seq's tokens, in order (int32 numpy array).")
      .def("ref_count", &KVForker::ref_count, py::arg("block"))
      .def("prepare_step", &prepare_step, py::arg("seqs"), py::arg("new_tokens"), py::arg("min_width") = 0,
           R"doc(Append new_tokens[i] slots to seqs[i] (all or nothing) and return a StepMetadata:
slot_mapping int64 [sum(new_tokens)] (batch order), block_tables int32 [B, W] (padded with 0,
W >= min_width), context_lens int32 [B] (lengths after the step), copies int32 [K, 2] (src, dst)
pairs to run before this step's KV writes.)doc")
      .def("take_copies", [](KVForker& f) { return pairs_to_numpy(f.take_copies()); },
           "Pending (src, dst) copy pairs as int32 [K, 2]; they are forgotten here.")
      .def_property_readonly("pending_copies", &KVForker::pending_copies)
      .def("check_invariants", &KVForker::check_invariants,
           "Raise AssertionError if a reference count or the free list is inconsistent.")
      .def("stats", [](const KVForker& f) {
        const auto s = f.stats();
        py::dict d;
        d["free_blocks"] = s.free_blocks;
        d["used_blocks"] = s.used_blocks;
        d["shared_blocks"] = s.shared_blocks;
        d["copies_made"] = s.copies_made;
        d["live_sequences"] = s.live_sequences;
        return d;
      });
}
