// raceguard's native op recorder: a global at::RecordFunction observer that records, per op,
// what the Python dispatch mode (capture/torch_ops.py) would record, into bounded per-thread
// buffers that Python drains into the happens-before engine (capture/native/backend.py).
//
// Per recorded op: a global sequence number (one atomic, shared with tick() so Python-side
// events share the order), the thread (its Python thread ident, or a native index for threads
// without a Python thread state), the op's plan (built once per schema from its alias info and
// the tables torch_ops passes to configure()), per tensor argument the StorageImpl (a weak
// reference keeps its address from being reused before the drain), dtype, shape, strides,
// offset, and the op's outputs (fresh allocations are decided at the drain, as _fresh does).
// The Python site is read without the GIL from the thread's frame chain (CPython 3.11); a code
// object is pinned (the GIL taken) the first time the process sees it, never inside an
// AccumulateGrad node (whose mutex torch holds while it runs ops).
//
// Which ops: those the Python dispatch mode sees. Ops called inside another recorded op's
// kernel are not (the mode is off while its handler runs the op); ops that decompose above the
// Python key (CompositeImplicitAutograd only) are not, but their decomposition is.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/Storage.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/runtime/interpreter.h>

#include <Python.h>
#define Py_BUILD_CORE 1
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <thread>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <type_traits>
#include <unordered_set>
#include <variant>
#include <vector>

#include "shadow.h"

#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030C0000
#error "raceguard's native recorder reads CPython 3.11 frames"
#endif

namespace {

// ---- the op's schema without a copy: RecordFunction::fn_ is private and operator_schema()
// copies the whole FunctionSchema per op. Explicit instantiation may name private members.
using FnVariant = std::variant<std::string, at::RecordFunction::schema_ref_t>;
template <typename Tag, typename Tag::type M>
struct Expose {
  friend typename Tag::type member(Tag) { return M; }
};
struct RecordFunctionFn {
  using type = FnVariant at::RecordFunction::*;
  friend type member(RecordFunctionFn);
};
template struct Expose<RecordFunctionFn, &at::RecordFunction::fn_>;

inline const c10::FunctionSchema* schema_of(const at::RecordFunction& fn) {
  const FnVariant& v = fn.*member(RecordFunctionFn());
  if (v.index() != 1) return nullptr;
  return &std::get<1>(v).get();
}

// ---- plans: what an op reads and writes, decided once per schema --------------------------
struct ArgSpec {
  uint32_t index;
  bool is_list;
  bool is_write;
};
struct Plan {
  int64_t id = 0;
  std::string name;  // "aten::add_.Tensor" (no overload suffix for "default")
  std::vector<ArgSpec> args;
  bool transparent = false;  // decomposes above the Python key: the mode never sees it
  bool metadata_only = false;
  bool fresh_input = false;
  // Every return is a written argument (add_, mul_.out): its storage is among the accesses,
  // so it can never be a fresh allocation and its outputs need no record.
  bool returns_written_args = false;
  std::vector<uint32_t> undeclared;  // written when the bool argument undeclared_cond is true
  int64_t undeclared_cond = -1;
  bool is_lift = false;    // aten::lift_fresh / aten::lift: torch.tensor()'s own copy
  bool is_detach = false;  // aten::detach_, which torch.tensor() runs on that copy
  // Inside an AccumulateGrad node: the op's one result (1) or its first written argument (2)
  // becomes the parameter's gradient (naming._GRAD_RESULT_OPS / _GRAD_INPLACE_OPS); 0: neither.
  int8_t grad_kind = 0;
  // Draws from (or reseeds) a random generator (capture/rng_ops.py, given by configure_rng):
  // the indices of its Generator? argument, its keyword-only device argument and the bool it
  // draws only when true (-1: none), and how many arguments are positional (the dispatch
  // mode's args, where rng_ops.device_of looks for a tensor).
  bool rng = false;
  int32_t rng_generator = -1, rng_device = -1, rng_cond = -1;
  uint32_t rng_positional = 0;
};

std::mutex g_plan_mu;
std::unordered_map<const c10::FunctionSchema*, Plan*> g_plans;  // under g_plan_mu
std::vector<Plan*> g_plan_list;                                 // by id, under g_plan_mu
std::unordered_set<std::string> g_metadata_only, g_fresh_input;
std::unordered_map<std::string, std::pair<std::vector<uint32_t>, int64_t>> g_undeclared;
std::unordered_map<std::string, std::string> g_rng_ops;  // base name -> its draw condition ("": none)
std::unordered_set<std::string> g_grad_result_ops, g_grad_inplace_ops;  // base names (configure_grad_ops)

bool tensor_type(const c10::TypePtr& t, bool& is_list) {
  auto kind = t->kind();
  if (kind == c10::TypeKind::TensorType) return (is_list = false, true);
  if (kind == c10::TypeKind::OptionalType)
    return tensor_type(t->castRaw<c10::OptionalType>()->getElementType(), is_list) && !is_list;
  if (kind == c10::TypeKind::ListType) {
    bool inner = false;
    auto el = t->castRaw<c10::ListType>()->getElementType();
    if (tensor_type(el, inner) && !inner) return (is_list = true, true);
  }
  return false;
}

// rng_ops.rng_generator's view of a schema: where the generator, device and condition are.
void plan_rng(Plan* p, const c10::FunctionSchema& schema, const std::string& cond) {
  p->rng = true;
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    const int32_t index = static_cast<int32_t>(i);
    if (p->rng_generator < 0 && a.type()->str().find("Generator") != std::string::npos) p->rng_generator = index;
    if (a.kwarg_only() && a.name() == "device") p->rng_device = index;
    if (!cond.empty() && a.name() == cond) p->rng_cond = index;
    if (!a.kwarg_only()) p->rng_positional = i + 1;
  }
}

Plan* build_plan(const c10::FunctionSchema& schema) {
  auto* p = new Plan();
  const std::string& base = schema.name();
  p->name = schema.overload_name().empty() ? base : base + "." + schema.overload_name();
  for (size_t i = 0; i < schema.arguments().size(); ++i) {
    const auto& a = schema.arguments()[i];
    bool is_list = false;
    if (!tensor_type(a.type(), is_list)) continue;
    const c10::AliasInfo* ai = a.alias_info();
    if (ai && !ai->isWrite()) continue;  // a view/alias source: no data read through it
    p->args.push_back({static_cast<uint32_t>(i), is_list, ai != nullptr});
  }
  p->metadata_only = g_metadata_only.count(base) > 0;
  p->returns_written_args = !schema.returns().empty();
  for (const auto& r : schema.returns()) {
    const c10::AliasInfo* ai = r.alias_info();
    if (ai == nullptr || !ai->isWrite()) p->returns_written_args = false;
  }
  p->fresh_input = g_fresh_input.count(base) > 0;
  p->is_lift = p->name == "aten::lift_fresh" || p->name == "aten::lift";
  p->is_detach = p->name == "aten::detach_";
  p->grad_kind = g_grad_result_ops.count(base) ? 1 : g_grad_inplace_ops.count(base) ? 2 : 0;
  auto u = g_undeclared.find(base);
  if (u != g_undeclared.end()) {
    p->undeclared = u->second.first;
    p->undeclared_cond = u->second.second;
  }
  auto rng = g_rng_ops.find(base);
  if (rng != g_rng_ops.end()) plan_rng(p, schema, rng->second);
  auto handle = c10::Dispatcher::singleton().findSchema({base, schema.overload_name()});
  if (handle) {
    using K = c10::DispatchKey;
    p->transparent = handle->hasKernelForDispatchKey(K::CompositeImplicitAutograd) &&
                     !handle->hasKernelForDispatchKey(K::CompositeExplicitAutograd) &&
                     !handle->hasKernelForDispatchKey(K::AutogradCPU) &&
                     !handle->hasKernelForDispatchKey(K::CPU);
  }
  return p;
}

thread_local const c10::FunctionSchema* t_plan_keys[64];
thread_local Plan* t_plan_vals[64];

inline Plan* plan_of(const c10::FunctionSchema* schema) {
  size_t slot = (reinterpret_cast<uintptr_t>(schema) >> 4) & 63;
  if (C10_LIKELY(t_plan_keys[slot] == schema)) return t_plan_vals[slot];
  Plan* p;
  {
    std::lock_guard<std::mutex> g(g_plan_mu);
    auto it = g_plans.find(schema);
    if (it == g_plans.end()) {
      p = build_plan(*schema);
      p->id = static_cast<int64_t>(g_plan_list.size());
      g_plan_list.push_back(p);
      g_plans.emplace(schema, p);
    } else {
      p = it->second;
    }
  }
  t_plan_keys[slot] = schema;
  t_plan_vals[slot] = p;
  return p;
}

// ---- records --------------------------------------------------------------------------
constexpr int kMaxDims = 8;
enum AccFlags : uint8_t { F_WRITE = 1, F_CONTIG = 2, F_OUTPUT = 4, F_TRUNCATED = 8 };
struct AccRec {
  c10::StorageImpl* storage;  // one weak reference held until drained
  c10::TensorImpl* tensor;    // one weak reference held, only inside AccumulateGrad (else null)
  int64_t offset;             // elements
  int64_t numel;
  int32_t itemsize;
  int8_t dtype;
  uint8_t flags;
  uint8_t ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
};
struct FrameRec {
  PyCodeObject* code;  // pinned: one reference held for the life of the process; null for a
                       // TorchScript frame, whose (file, line, function) is script_frames[lasti]
  int32_t lasti;       // bytes, as frame.f_lasti
};

// TorchScript frames (ops on threads with no Python frames: ThroughputBenchmark's callers, the
// inter-op pool of torch.jit.fork), interned as (file, line, function).
std::mutex g_script_mu;
std::unordered_map<std::string, int32_t> g_script_ids;                       // under g_script_mu
std::vector<std::tuple<std::string, int64_t, std::string>> g_script_frames;  // under g_script_mu
struct OpRec {
  uint64_t seq;
  Plan* plan;
  c10::TensorImpl* param;  // weak; the AccumulateGrad node's variable, else null
  uint64_t acc_begin;
  uint64_t frame_begin;
  uint32_t nacc;
  uint32_t nout;
  uint32_t nframes;
  uint32_t backward;  // 1 inside a backward node
  bool draws;         // draws from (or reseeds) a random generator, on draw_device
  c10::DeviceType draw_device_type;
  c10::DeviceIndex draw_device_index;
  c10::GeneratorImpl* generator;  // the generator argument, one reference held until drained;
                                  // null: the device's default generator
};

static_assert(std::is_trivially_default_constructible_v<OpRec> && std::is_trivially_default_constructible_v<AccRec> &&
              std::is_trivially_default_constructible_v<FrameRec>, "ring records are left uninitialised");

// A ring's storage: its own anonymous mapping, left uninitialised, so the pages a thread never
// reaches are never touched; and the pages of records already drained are handed back to the
// kernel (release_drained), so a thread's resident share stays near what is pending rather
// than the whole ~8.5 MB its positions sweep through as they go round.
constexpr size_t kReleaseBytes = size_t(64) << 10;  // at most one madvise per 64 KiB drained
template <class T>
struct Ring {
  T* data = nullptr;
  size_t n = 0;
  size_t bytes = 0;
  uint64_t released = 0;  // consumer-private: records before it were handed back (or never touched)
  Ring() = default;
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() { unmap(); }
  void unmap() {
    if (data != nullptr) munmap(data, bytes);
    data = nullptr;
    n = bytes = 0;
  }
  void resize(size_t count) {
    unmap();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t want = (count * sizeof(T) + page - 1) / page * page;
    void* m = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    data = static_cast<T*>(m);  // zero pages on first touch; trivial types need no constructor
    n = count;
    bytes = want;
    released = 0;
  }
  size_t size() const { return n; }
  T& operator[](size_t i) { return data[i]; }
  const T& operator[](size_t i) const { return data[i]; }
  // Hands back the whole pages of the records in [released, tail) (all drained). Called by
  // the consumer before it publishes ``tail``: until then the producer cannot reach those
  // slots again, and a slot it reaches later is a fresh zero page.
  void release_drained(uint64_t tail) {
    if (tail < released + 1 || (tail - released) * sizeof(T) < kReleaseBytes) return;
    if (tail - released >= n) released = tail - n;  // every slot at most once
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t lo = static_cast<size_t>(released % n), hi = static_cast<size_t>(tail % n);
    if (lo < hi) {
      release_bytes(lo * sizeof(T), hi * sizeof(T), page);
    } else {  // wrapped (or the whole ring)
      release_bytes(lo * sizeof(T), n * sizeof(T), page);
      release_bytes(0, hi * sizeof(T), page);
    }
    released = tail;
  }
  void release_bytes(size_t from, size_t to, size_t page) {
    const size_t a = (from + page - 1) / page * page, b = to / page * page;  // whole pages only
    if (a < b) madvise(reinterpret_cast<char*>(data) + a, b - a, MADV_DONTNEED);
  }
};

struct ThreadBuf {
  int64_t key = 0;  // Python thread ident (> 0) or -(native index)
  bool exited = false;
  // single producer (the thread), single consumer (the drainer, under g_drain_mu)
  std::atomic<uint64_t> op_head{0}, op_tail{0};
  uint64_t acc_head = 0, frame_head = 0;  // producer-private; published with op_head
  std::atomic<uint64_t> acc_tail{0}, frame_tail{0};
  Ring<OpRec> ops;
  Ring<AccRec> accs;
  Ring<FrameRec> frames;
  std::atomic<uint64_t> lost{0};
  // open record (written at the op's start, published at its end with the outputs)
  bool open = false;
  int depth = 0;           // recorded ops open on this thread (nested ones are invisible)
  int backward_depth = 0;  // BACKWARD_FUNCTION ranges open
  std::vector<uint8_t> stack;  // per open FUNCTION range: 1 = a recorded op
  PyCodeObject* pinned_cache[256] = {};
};

std::atomic<uint64_t> g_seq{1};
std::atomic<bool> g_enabled{false};
std::mutex g_mu;  // buffers list, pinned set
std::vector<ThreadBuf*> g_bufs;
std::unordered_set<PyCodeObject*> g_pinned;
std::atomic<int64_t> g_native_threads{0};
std::atomic<uint64_t> g_lost_total{0};
std::atomic<uint64_t> g_unpinned{0};
size_t g_cap_ops = 1 << 14, g_cap_accs = 1 << 15, g_cap_frames = 1 << 17;
constexpr int kMaxFrames = 64;
at::CallbackHandle g_handle = 0;
bool g_installed = false;

std::mutex g_wake_mu;
std::condition_variable g_wake;
std::atomic<bool> g_wake_pending{false};

struct BufOwner {
  ThreadBuf* buf = nullptr;
  ~BufOwner() {
    if (buf) {
      std::lock_guard<std::mutex> g(g_mu);
      buf->exited = true;  // freed by the drainer once empty
      // An op run by a later thread-local destructor of this thread gets a new buffer, never
      // this one, which the drainer may free.
      buf = nullptr;
    }
  }
};
thread_local BufOwner t_owner;

// Buffers of threads that ended, drained empty, kept for the next threads (a server starting a
// thread per request would otherwise allocate and touch ~8.5 MB per thread). Under g_mu.
constexpr size_t kMaxFreeBufs = 8;
std::vector<ThreadBuf*> g_free_bufs;

ThreadBuf* new_buf() {
  {
    std::lock_guard<std::mutex> g(g_mu);
    while (!g_free_bufs.empty()) {
      ThreadBuf* b = g_free_bufs.back();
      g_free_bufs.pop_back();
      if (b->ops.size() == g_cap_ops && b->accs.size() == g_cap_accs && b->frames.size() == g_cap_frames) return b;
      delete b;  // made before install() changed the capacities
    }
  }
  auto* b = new ThreadBuf();
  b->ops.resize(g_cap_ops);
  b->accs.resize(g_cap_accs);
  b->frames.resize(g_cap_frames);
  return b;
}

// A drained buffer of a thread that ended, made ready for another thread (the code objects
// its cache names stay pinned for the life of the process).
void recycle_buf(ThreadBuf* b) {
  b->exited = false;
  b->op_head.store(0);
  b->op_tail.store(0);
  b->acc_head = b->frame_head = 0;
  b->acc_tail.store(0);
  b->frame_tail.store(0);
  b->ops.released = b->accs.released = b->frames.released = 0;
  b->lost.store(0);
  b->open = false;
  b->depth = b->backward_depth = 0;
  b->stack.clear();
}

inline ThreadBuf* buf() {
  ThreadBuf* b = t_owner.buf;
  if (C10_LIKELY(b != nullptr)) return b;
  b = new_buf();
  PyThreadState* ts = PyGILState_GetThisThreadState();  // thread-local, no GIL needed
  if (ts != nullptr)
    b->key = static_cast<int64_t>(ts->thread_id);
  else
    b->key = -(g_native_threads.fetch_add(1) + 1);
  {
    std::lock_guard<std::mutex> g(g_mu);
    g_bufs.push_back(b);
  }
  t_owner.buf = b;
  return b;
}

inline void wake_drainer() {
  if (!g_wake_pending.exchange(true)) g_wake.notify_one();
}

// Pin a code object so that its address stays valid (and unique) until the drain. Only the
// first sighting in the process takes the GIL.
inline bool pin(ThreadBuf* b, PyCodeObject* code, bool may_take_gil) {
  size_t slot = (reinterpret_cast<uintptr_t>(code) >> 4) & 255;
  if (C10_LIKELY(b->pinned_cache[slot] == code)) return true;
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (g_pinned.count(code)) {
      b->pinned_cache[slot] = code;
      return true;
    }
  }
  if (!may_take_gil || _Py_IsFinalizing()) return false;
  PyGILState_STATE st = PyGILState_Ensure();
  Py_INCREF(code);
  bool fresh;
  {
    std::lock_guard<std::mutex> g(g_mu);
    fresh = g_pinned.insert(code).second;
  }
  if (!fresh) Py_DECREF(code);
  PyGILState_Release(st);
  b->pinned_cache[slot] = code;
  return true;
}

inline uint32_t read_frames(ThreadBuf* b, bool may_take_gil) {
  PyThreadState* ts = PyGILState_GetThisThreadState();
  if (ts == nullptr || ts->cframe == nullptr) return 0;
  _PyInterpreterFrame* f = ts->cframe->current_frame;
  uint32_t n = 0;
  const uint64_t cap = b->frames.size();
  while (f != nullptr && n < kMaxFrames) {
    if (!_PyFrame_IsIncomplete(f)) {
      PyCodeObject* code = f->f_code;
      if (!pin(b, code, may_take_gil)) {  // the outer part of the stack is lost
        g_unpinned.fetch_add(1, std::memory_order_relaxed);
        break;
      }
      if (b->frame_head + 1 - b->frame_tail.load(std::memory_order_acquire) > cap) break;
      FrameRec& r = b->frames[b->frame_head++ % cap];
      r.code = code;
      r.lasti = _PyInterpreterFrame_LASTI(f) * static_cast<int32_t>(sizeof(_Py_CODEUNIT));
      ++n;
    }
    f = f->previous;
  }
  return n;
}

constexpr int kMaxScriptFrames = 16;

inline uint32_t read_script_frames(ThreadBuf* b) {
  std::vector<torch::jit::StackEntry> stack = torch::jit::currentCallstack();
  uint32_t n = 0;
  const uint64_t cap = b->frames.size();
  for (auto it = stack.rbegin(); it != stack.rend() && n < kMaxScriptFrames; ++it) {
    auto where = it->range.file_line_col();
    if (!where) continue;
    const std::string& file = std::get<0>(*where);
    const int64_t line = static_cast<int64_t>(std::get<1>(*where));
    std::string key = file + '\0' + std::to_string(line) + '\0' + it->filename;
    int32_t id;
    {
      std::lock_guard<std::mutex> g(g_script_mu);
      auto found = g_script_ids.find(key);
      if (found == g_script_ids.end()) {
        id = static_cast<int32_t>(g_script_frames.size());
        g_script_frames.emplace_back(file, line, it->filename);
        g_script_ids.emplace(std::move(key), id);
      } else {
        id = found->second;
      }
    }
    if (b->frame_head + 1 - b->frame_tail.load(std::memory_order_acquire) > cap) break;
    FrameRec& r = b->frames[b->frame_head++ % cap];
    r.code = nullptr;
    r.lasti = id;
    ++n;
  }
  return n;
}

// Appends one access; false when the buffer is full.
inline bool add_tensor(ThreadBuf* b, const at::Tensor& t, uint8_t flags, bool keep_tensor) {
  // A Python number torch wrapped for the op (x.add_(1)): the dispatch mode sees the number. A
  // nested tensor has no sizes to read (sizes() throws, and torch prints that on stderr); the
  // dispatch mode skips it too (no plain storage).
  if (!t.defined() || !t.has_storage() || t.unsafeGetTensorImpl()->is_wrapped_number() || t.is_nested())
    return true;
  const uint64_t cap = b->accs.size();
  if (b->acc_head + 1 - b->acc_tail.load(std::memory_order_acquire) > cap) return false;
  AccRec& a = b->accs[b->acc_head++ % cap];
  c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
  c10::raw::weak_intrusive_ptr::incref(st);
  a.storage = st;
  if (keep_tensor) {
    c10::raw::weak_intrusive_ptr::incref(t.unsafeGetTensorImpl());
    a.tensor = t.unsafeGetTensorImpl();
  } else {
    a.tensor = nullptr;
  }
  a.offset = t.storage_offset();
  a.numel = t.numel();
  a.itemsize = static_cast<int32_t>(t.itemsize());
  a.dtype = static_cast<int8_t>(t.scalar_type());
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  const size_t nd = std::min<size_t>(sizes.size(), kMaxDims);
  a.ndim = static_cast<uint8_t>(nd);
  for (size_t d = 0; d < nd; ++d) {
    a.sizes[d] = sizes[d];
    a.strides[d] = strides[d];
  }
  if (sizes.size() > kMaxDims) flags |= F_TRUNCATED;
  if (t.is_contiguous()) flags |= F_CONTIG;
  a.flags = flags;
  return true;
}

inline bool add_ivalue(ThreadBuf* b, const c10::IValue& v, uint8_t flags, bool keep, uint32_t& n) {
  if (v.isTensor()) {
    uint64_t before = b->acc_head;
    if (!add_tensor(b, v.toTensor(), flags, keep)) return false;
    n += static_cast<uint32_t>(b->acc_head - before);
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) {
      uint64_t before = b->acc_head;
      if (!add_tensor(b, t, flags, keep)) return false;
      n += static_cast<uint32_t>(b->acc_head - before);
    }
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toListRef()) {
      if (e.isTensor()) {
        uint64_t before = b->acc_head;
        if (!add_tensor(b, e.toTensor(), flags, keep)) return false;
        n += static_cast<uint32_t>(b->acc_head - before);
      }
    }
  } else if (v.isTuple()) {  // nested outputs (_foreach ops return lists)
    for (const c10::IValue& e : v.toTupleRef().elements())
      if (!add_ivalue(b, e, flags, keep, n)) return false;
  }
  return true;
}

void release_generator(OpRec& r) {
  if (r.generator) c10::intrusive_ptr<c10::GeneratorImpl>::reclaim(r.generator);  // drops it
  r.generator = nullptr;
}

void release_acc(AccRec& a) {
  if (a.storage) c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim(a.storage);  // drops it
  if (a.tensor) c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(a.tensor);
  a.storage = nullptr;
  a.tensor = nullptr;
}

// Drops the open record (the buffer filled up while it was written).
void abandon(ThreadBuf* b, OpRec& r) {
  const uint64_t cap = b->accs.size();
  for (uint64_t i = r.acc_begin; i < b->acc_head; ++i) release_acc(b->accs[i % cap]);
  if (r.param) c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(r.param);
  r.param = nullptr;
  release_generator(r);
  b->acc_head = r.acc_begin;
  b->frame_head = r.frame_begin;
  b->open = false;
  b->lost.fetch_add(1, std::memory_order_relaxed);
  g_lost_total.fetch_add(1, std::memory_order_relaxed);
  wake_drainer();
}

// The drainer is woken once a buffer holds this share of its capacity (1/16: 1,024 records by
// default). Records hold weak references that keep dead StorageImpl objects (not their data) in
// the target's heap until drained; waking at half full let them split freed chunks there, and a
// one-thread MLP training peaked at 381 MB against 346 MB this way (plain: 313 MB).
constexpr uint64_t kWakeShare = 16;

inline void publish(ThreadBuf* b) {
  b->open = false;
  const uint64_t h = b->op_head.load(std::memory_order_relaxed) + 1;
  b->op_head.store(h, std::memory_order_release);
  const uint64_t used = h - b->op_tail.load(std::memory_order_relaxed);
  if (used * kWakeShare > b->ops.size() ||
      (b->acc_head - b->acc_tail.load(std::memory_order_relaxed)) * kWakeShare > b->accs.size())
    wake_drainer();
}

inline c10::TensorImpl* accumulating_variable() {
  auto node = torch::autograd::get_current_node();  // a thread-local: null outside backward
  if (!node) return nullptr;
  auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node.get());
  if (acc == nullptr || !acc->variable.defined()) return nullptr;
  c10::TensorImpl* impl = acc->variable.unsafeGetTensorImpl();
  c10::raw::weak_intrusive_ptr::incref(impl);
  return impl;
}

// rng_ops.rng_generator and device_of for a recorded RNG op: whether it draws this time, from
// which generator and on which device.
inline void note_draw(OpRec& r, const Plan& plan, c10::ArrayRef<c10::IValue> inputs) {
  if (plan.rng_cond >= 0 && static_cast<size_t>(plan.rng_cond) < inputs.size()) {
    const c10::IValue& c = inputs[plan.rng_cond];
    if (c.isBool() && !c.toBool()) return;  // dropout in eval mode
  }
  c10::Device device(c10::kCPU);
  if (plan.rng_device >= 0 && static_cast<size_t>(plan.rng_device) < inputs.size() &&
      inputs[plan.rng_device].isDevice()) {
    device = inputs[plan.rng_device].toDevice();
  } else {
    for (size_t i = 0; i < plan.rng_positional && i < inputs.size(); ++i) {
      if (!inputs[i].isTensor()) continue;
      const at::Tensor& t = inputs[i].toTensor();
      // An undefined tensor is None to the dispatch mode, a wrapped number a number.
      if (!t.defined() || t.unsafeGetTensorImpl()->is_wrapped_number()) continue;
      device = t.device();
      break;
    }
  }
  if (plan.rng_generator >= 0 && static_cast<size_t>(plan.rng_generator) < inputs.size() &&
      inputs[plan.rng_generator].isGenerator()) {
    r.generator = inputs[plan.rng_generator].toGenerator().unsafeGetGeneratorImpl();
    c10::raw::intrusive_ptr::incref(r.generator);
  }
  r.draw_device_type = device.type();
  r.draw_device_index = device.index();
  r.draws = true;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  if (!g_enabled.load(std::memory_order_relaxed)) return nullptr;
  ThreadBuf* b = buf();
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) {
    ++b->backward_depth;
    return nullptr;
  }
  const c10::FunctionSchema* schema = schema_of(fn);
  if (schema == nullptr) {  // a named range (the engine's evaluate_function, user ranges)
    b->stack.push_back(0);
    return nullptr;
  }
  Plan* plan = plan_of(schema);
  // Code that excludes the Python key (torch.tensor's lift_fresh/detach_, Parameter's detach)
  // runs ops no dispatch mode sees.
  if (b->depth > 0 || plan->transparent || c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::Python)) {
    b->stack.push_back(0);
    return nullptr;
  }
  b->stack.push_back(1);
  ++b->depth;
  if (b->open) publish(b);  // an op recorded inside another one's Python callback
  const uint64_t cap = b->ops.size();
  const uint64_t h = b->op_head.load(std::memory_order_relaxed);
  if (h + 1 - b->op_tail.load(std::memory_order_acquire) > cap) {
    b->lost.fetch_add(1, std::memory_order_relaxed);
    g_lost_total.fetch_add(1, std::memory_order_relaxed);
    wake_drainer();
    b->stack.back() = 2;  // counted, not recorded
    return nullptr;
  }
  OpRec& r = b->ops[h % cap];
  r.seq = g_seq.fetch_add(1, std::memory_order_relaxed);
  r.plan = plan;
  r.acc_begin = b->acc_head;
  r.frame_begin = b->frame_head;
  r.nacc = r.nout = r.nframes = 0;
  r.param = accumulating_variable();
  r.backward = b->backward_depth > 0 || r.param != nullptr;
  r.draws = false;
  r.generator = nullptr;
  b->open = true;
  const bool keep = r.param != nullptr;
  if (!plan->metadata_only) {
    auto inputs = fn.inputs();
    uint32_t n = 0;
    for (const ArgSpec& a : plan->args) {
      if (a.index >= inputs.size()) continue;
      if (!add_ivalue(b, inputs[a.index], a.is_write ? F_WRITE : 0, keep, n)) return abandon(b, r), nullptr;
    }
    if (plan->undeclared_cond >= 0 && static_cast<size_t>(plan->undeclared_cond) < inputs.size()) {
      const c10::IValue& c = inputs[plan->undeclared_cond];
      if (c.isBool() && c.toBool()) {
        for (uint32_t i : plan->undeclared)
          if (i < inputs.size() && inputs[i].isTensor())
            if (!add_ivalue(b, inputs[i], F_WRITE, keep, n)) return abandon(b, r), nullptr;
      }
    }
    r.nacc = n;
  }
  if (C10_UNLIKELY(plan->rng)) note_draw(r, *plan, fn.inputs());
  r.nframes = read_frames(b, r.param == nullptr);
  if (r.nframes == 0) r.nframes = read_script_frames(b);
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  ThreadBuf* b = t_owner.buf;
  if (b == nullptr) return;
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) {
    if (b->backward_depth > 0) --b->backward_depth;
    return;
  }
  if (b->stack.empty()) return;  // started before the recorder was installed
  const uint8_t kind = b->stack.back();
  b->stack.pop_back();
  if (kind == 0) return;
  --b->depth;
  if (kind != 1 || !b->open) return;
  OpRec& r = b->ops[b->op_head.load(std::memory_order_relaxed) % b->ops.size()];
  uint32_t n = 0;
  if (r.plan->returns_written_args && !r.plan->metadata_only && r.param == nullptr) return publish(b);
  for (const c10::IValue& v : fn.outputs())
    if (!add_ivalue(b, v, F_OUTPUT, r.param != nullptr, n)) return abandon(b, r);
  r.nout = n;
  publish(b);
}

// ---- fork: a child must not inherit a mutex some other (vanished) thread held -------------
std::mutex g_drain_mu;
bool g_reaper_started = false;  // the reaper thread (below); with the GIL

void before_fork() {
  g_plan_mu.lock();
  g_mu.lock();
  g_script_mu.lock();
}
void after_fork_in_parent() {
  g_script_mu.unlock();
  g_mu.unlock();
  g_plan_mu.unlock();
}
void after_fork_in_child() {
  after_fork_in_parent();
  // Held with the GIL, which the forking thread has, or by the reaper without it.
  new (&g_drain_mu) std::mutex();  // (the reaper, gone with its thread, may have held it)
  g_reaper_started = false;  // the child's first drain starts its own
  new (&g_wake_mu) std::mutex();
  new (&g_wake) std::condition_variable();
}

// ---- Python interface ---------------------------------------------------------------------
PyObject* py_tick(PyObject*, PyObject* const*, Py_ssize_t) {
  return PyLong_FromUnsignedLongLong(g_seq.fetch_add(1, std::memory_order_relaxed));
}

void start_reaper();

PyObject* py_install(PyObject*, PyObject* args) {
  PyObject *meta, *fresh, *undeclared;
  unsigned long long cap_ops, cap_accs, cap_frames;
  if (!PyArg_ParseTuple(args, "OOOKKK", &meta, &fresh, &undeclared, &cap_ops, &cap_accs, &cap_frames))
    return nullptr;
  try {
    std::lock_guard<std::mutex> g(g_plan_mu);
    for (auto [src, dst] : {std::pair{meta, &g_metadata_only}, std::pair{fresh, &g_fresh_input}}) {
      PyObject* it = PyObject_GetIter(src);
      if (!it) return nullptr;
      while (PyObject* item = PyIter_Next(it)) {
        dst->insert(PyUnicode_AsUTF8(item));
        Py_DECREF(item);
      }
      Py_DECREF(it);
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(undeclared, &pos, &key, &value)) {
      PyObject* indices = PyTuple_GetItem(value, 0);
      std::vector<uint32_t> idx;
      for (Py_ssize_t i = 0; indices && i < PyTuple_Size(indices); ++i)
        idx.push_back(static_cast<uint32_t>(PyLong_AsLong(PyTuple_GetItem(indices, i))));
      g_undeclared[PyUnicode_AsUTF8(key)] = {idx, PyLong_AsLong(PyTuple_GetItem(value, 1))};
    }
    if (PyErr_Occurred()) return nullptr;
    g_cap_ops = std::max<unsigned long long>(cap_ops, 4);
    g_cap_accs = std::max<unsigned long long>(cap_accs, 16);
    g_cap_frames = std::max<unsigned long long>(cap_frames, 64);
    if (!g_installed) {
      at::RecordFunctionCallback cb(&on_start, &on_end);
      cb.scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION});
      cb.needsInputs(true);
      cb.needsOutputs(true);
      g_handle = at::addGlobalCallback(cb);
      g_installed = true;
      pthread_atfork(&before_fork, &after_fork_in_parent, &after_fork_in_child);
    } else {
      at::reenableCallback(g_handle);
    }
    g_enabled.store(true);
    start_reaper();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// configure_rng({op base name: the bool argument it draws only when true, or None}): the ops
// that draw from a random generator (rng_ops.draw_conditions()). Call before install: plans
// already built keep what they were built with.
PyObject* py_configure_rng(PyObject*, PyObject* table) {
  if (!PyDict_Check(table)) {
    PyErr_SetString(PyExc_TypeError, "configure_rng expects a dict");
    return nullptr;
  }
  std::lock_guard<std::mutex> g(g_plan_mu);
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(table, &pos, &key, &value)) {
    const char* name = PyUnicode_AsUTF8(key);
    const char* cond = value == Py_None ? "" : PyUnicode_AsUTF8(value);
    if (name == nullptr || cond == nullptr) return nullptr;
    g_rng_ops[name] = cond;
  }
  Py_RETURN_NONE;
}

PyObject* py_pause(PyObject*, PyObject*) {
  g_enabled.store(false);
  // Disabled, the dispatcher is back on its fast path (no inputs boxed for us). Ranges already
  // open keep the callbacks they started with, so every recorded op still ends.
  if (g_installed) at::disableCallback(g_handle);
  Py_RETURN_NONE;
}

PyObject* py_recording(PyObject*, PyObject*) { return PyBool_FromLong(g_enabled.load()); }

PyObject* new_tuple_of(const int64_t* v, int n) {
  PyObject* t = PyTuple_New(n);
  for (int i = 0; i < n; ++i) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v[i]));
  return t;
}

// The tensor a weak reference names (a new reference), or None when it died (or for null).
PyObject* tensor_or_none(c10::TensorImpl* weak_ref) {
  if (weak_ref != nullptr) {
    auto weak = c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim_copy(weak_ref);
    if (auto strong = weak.lock()) return THPVariable_Wrap(at::Tensor(std::move(strong)));
  }
  Py_RETURN_NONE;
}

// One access as (storage or None, storage address, flags, dtype, shape, offset, itemsize,
// numel, strides, tensor or None).
PyObject* access_tuple(const AccRec& a) {
  PyObject* storage = Py_None;
  Py_INCREF(Py_None);
  if (a.storage != nullptr) {  // null: it died and the reaper dropped the reference
    auto weak = c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim_copy(a.storage);
    if (auto strong = weak.lock()) {
      Py_DECREF(Py_None);
      storage = THPStorage_Wrap(c10::Storage(std::move(strong)));
    }
  }
  PyObject* tensor = tensor_or_none(a.tensor);
  PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(a.dtype)));
  Py_INCREF(dtype);
  return Py_BuildValue("(NKiNNLiLNN)", storage, (unsigned long long)reinterpret_cast<uintptr_t>(a.storage),
                       (int)a.flags, dtype, new_tuple_of(a.sizes, a.ndim), (long long)a.offset, (int)a.itemsize,
                       (long long)a.numel, new_tuple_of(a.strides, a.ndim), tensor);
}

// ---- draining -----------------------------------------------------------------------------
// A snapshot of the published records of every buffer, in sequence order.
struct DrainItem {
  uint64_t seq;
  ThreadBuf* b;
  uint64_t idx;
};
struct Snapshot {
  std::vector<ThreadBuf*> bufs;
  std::vector<uint64_t> heads;  // per buffer: the first record not in the snapshot
  std::vector<DrainItem> items;
};

void take_snapshot(Snapshot& snap, uint64_t limit) {
  {
    std::lock_guard<std::mutex> g(g_mu);
    snap.bufs.assign(g_bufs.begin(), g_bufs.end());
  }
  snap.items.clear();
  snap.heads.assign(snap.bufs.size(), 0);
  for (size_t k = 0; k < snap.bufs.size(); ++k) {
    ThreadBuf* b = snap.bufs[k];
    uint64_t h = b->op_head.load(std::memory_order_acquire);
    uint64_t i = b->op_tail.load(std::memory_order_relaxed);
    for (; i < h; ++i) {
      const OpRec& r = b->ops[i % b->ops.size()];
      if (limit && r.seq >= limit) break;
      snap.items.push_back({r.seq, b, i});
    }
    snap.heads[k] = i;
  }
  std::sort(snap.items.begin(), snap.items.end(),
            [](const DrainItem& x, const DrainItem& y) { return x.seq < y.seq; });
}

// Releases the snapshot's records' references and hands their space back to the producers;
// frees the buffers of threads that ended and were drained empty.
void release_snapshot(Snapshot& snap) {
  for (size_t k = 0; k < snap.bufs.size(); ++k) {
    ThreadBuf* b = snap.bufs[k];
    uint64_t t = b->op_tail.load(std::memory_order_relaxed);
    if (snap.heads[k] == t) continue;
    uint64_t acc_end = 0, frame_end = 0;
    for (uint64_t i = t; i < snap.heads[k]; ++i) {
      OpRec& r = b->ops[i % b->ops.size()];
      for (uint32_t j = 0; j < r.nacc + r.nout; ++j) release_acc(b->accs[(r.acc_begin + j) % b->accs.size()]);
      if (r.param) c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(r.param);
      r.param = nullptr;
      release_generator(r);
      acc_end = r.acc_begin + r.nacc + r.nout;
      frame_end = r.frame_begin + r.nframes;
    }
    b->accs.release_drained(acc_end);
    b->frames.release_drained(frame_end);
    b->ops.release_drained(snap.heads[k]);
    b->acc_tail.store(acc_end, std::memory_order_release);
    b->frame_tail.store(frame_end, std::memory_order_release);
    b->op_tail.store(snap.heads[k], std::memory_order_release);
  }
  {
    std::lock_guard<std::mutex> g(g_mu);
    for (auto it = g_bufs.begin(); it != g_bufs.end();) {
      ThreadBuf* b = *it;
      if (b->exited && b->op_head.load() == b->op_tail.load()) {
        it = g_bufs.erase(it);
        if (g_free_bufs.size() < kMaxFreeBufs) {
          recycle_buf(b);
          g_free_bufs.push_back(b);
        } else {
          delete b;
        }
      } else {
        ++it;
      }
    }
  }
  snap.bufs.clear();
  snap.heads.clear();
  snap.items.clear();
}

// Sites: the (code, lasti, ...) tuple of a record's frames, interned so that every op at one
// stack shares one tuple (bounded: past kMaxSites distinct stacks, new ones are not kept).
constexpr size_t kMaxSites = 1 << 16;
std::unordered_multimap<uint64_t, PyObject*>* g_sites = new std::unordered_multimap<uint64_t, PyObject*>();

// ``frame_at(j)`` for j < n: the frames, innermost first.
template <class FrameAt>
PyObject* intern_site(uint32_t n, FrameAt frame_at) {
  uint64_t h = 1469598103934665603ull ^ n;
  for (uint32_t j = 0; j < n; ++j) {
    const FrameRec& f = frame_at(j);
    h = (h ^ reinterpret_cast<uintptr_t>(f.code)) * 1099511628211ull;
    h = (h ^ static_cast<uint32_t>(f.lasti)) * 1099511628211ull;
  }
  auto range = g_sites->equal_range(h);
  for (auto it = range.first; it != range.second; ++it) {
    PyObject* t = it->second;
    if (PyTuple_GET_SIZE(t) != 2 * static_cast<Py_ssize_t>(n)) continue;
    bool same = true;
    for (uint32_t j = 0; j < n && same; ++j) {
      const FrameRec& f = frame_at(j);
      PyObject* code = f.code ? reinterpret_cast<PyObject*>(f.code) : Py_None;
      same = PyTuple_GET_ITEM(t, 2 * j) == code && PyLong_AsLong(PyTuple_GET_ITEM(t, 2 * j + 1)) == f.lasti;
    }
    if (same) {
      Py_INCREF(t);
      return t;
    }
  }
  PyObject* site = PyTuple_New(2 * n);
  if (!site) return nullptr;
  for (uint32_t j = 0; j < n; ++j) {
    const FrameRec& f = frame_at(j);
    PyObject* code = f.code ? reinterpret_cast<PyObject*>(f.code) : Py_None;  // None: a script frame
    Py_INCREF(code);
    PyTuple_SET_ITEM(site, 2 * j, code);
    PyTuple_SET_ITEM(site, 2 * j + 1, PyLong_FromLong(f.lasti));
  }
  if (g_sites->size() < kMaxSites) {
    Py_INCREF(site);
    g_sites->emplace(h, site);
  }
  return site;
}

PyObject* site_tuple(ThreadBuf* b, const OpRec& r) {
  const uint64_t cap = b->frames.size();
  return intern_site(r.nframes, [&](uint32_t j) -> const FrameRec& { return b->frames[(r.frame_begin + j) % cap]; });
}

// current_site() -> the calling thread's Python stack as a recorded op's site: the interned
// (code, lasti, ...) tuple of at most kMaxFrames frames, innermost first (stacks.op_site_function
// uses it while the recorder runs: cheaper than torch's gather_traceback). Needs the GIL; the
// tuple holds the code objects, so none is pinned.
PyObject* py_current_site(PyObject*, PyObject*) {
  PyThreadState* ts = PyThreadState_Get();
  FrameRec frames[kMaxFrames];
  uint32_t n = 0;
  for (_PyInterpreterFrame* f = ts->cframe ? ts->cframe->current_frame : nullptr; f != nullptr && n < kMaxFrames;
       f = f->previous) {
    if (_PyFrame_IsIncomplete(f)) continue;
    frames[n].code = f->f_code;
    frames[n].lasti = _PyInterpreterFrame_LASTI(f) * static_cast<int32_t>(sizeof(_Py_CODEUNIT));
    ++n;
  }
  return intern_site(n, [&](uint32_t j) -> const FrameRec& { return frames[j]; });
}

// The random draw of a record: None, or (its generator, None for the device's default one,
// device) as rng_ops.rng_generator and device_of give them.
PyObject* draw_tuple(const OpRec& r) {
  if (!r.draws) Py_RETURN_NONE;
  PyObject* generator = Py_None;
  if (r.generator)
    generator = THPGenerator_Wrap(at::Generator(c10::intrusive_ptr<c10::GeneratorImpl>::reclaim_copy(r.generator)));
  else
    Py_INCREF(Py_None);
  const std::string device = c10::Device(r.draw_device_type, r.draw_device_index).str();
  return Py_BuildValue("(Ns)", generator, device.c_str());
}

// (seq, thread key, plan id, backward, site, accesses, outputs, param, draw)
// With ``only`` non-empty: just the accesses and outputs it flags.
PyObject* record_tuple(ThreadBuf* b, const OpRec& r, const std::vector<uint8_t>& only = {}) {
  PyObject* site = site_tuple(b, r);
  if (!site) return nullptr;
  PyObject* accs = PyList_New(0);
  PyObject* outs = PyList_New(0);
  for (uint32_t j = 0; j < r.nacc + r.nout; ++j) {
    if (!only.empty() && !only[j]) continue;
    AccRec& a = b->accs[(r.acc_begin + j) % b->accs.size()];
    PyObject* t = access_tuple(a);
    PyList_Append(j < r.nacc ? accs : outs, t);
    Py_DECREF(t);
  }
  PyObject* param = tensor_or_none(r.param);
  PyObject* acc_tuple = PyList_AsTuple(accs);
  PyObject* out_tuple = PyList_AsTuple(outs);
  Py_DECREF(accs);
  Py_DECREF(outs);
  return Py_BuildValue("(KLLiNNNNN)", (unsigned long long)r.seq, (long long)b->key, (long long)r.plan->id,
                       (int)r.backward, site, acc_tuple, out_tuple, param, draw_tuple(r));
}

// A fast drain is under way (fast_drain() returned a record to Python and holds a snapshot):
// drain() and discard() would release the same records a second time.
bool g_fast_active = false;

PyObject* refuse_during_fast_drain() {
  PyErr_SetString(PyExc_RuntimeError, "a fast drain is under way: finish it with fast_drain() first");
  return nullptr;
}

// drain(limit_seq) -> [(seq, thread key, plan id, backward, site, accesses, outputs, param, draw)]
// for every published record with seq < limit_seq (all when 0), sorted by seq. Needs the GIL.
PyObject* py_drain(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  unsigned long long limit = nargs > 0 ? PyLong_AsUnsignedLongLong(args[0]) : 0;
  if (PyErr_Occurred()) return nullptr;
  std::unique_lock<std::mutex> dg(g_drain_mu, std::try_to_lock);
  if (!dg.owns_lock()) return PyList_New(0);  // another thread is draining
  if (g_fast_active) return refuse_during_fast_drain();
  Snapshot snap;
  take_snapshot(snap, limit);
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(snap.items.size()));
  if (!out) return nullptr;
  for (size_t n = 0; n < snap.items.size(); ++n) {
    ThreadBuf* b = snap.items[n].b;
    PyObject* rec = record_tuple(b, b->ops[snap.items[n].idx % b->ops.size()]);
    if (!rec) {
      Py_DECREF(out);
      release_snapshot(snap);
      return nullptr;
    }
    PyList_SET_ITEM(out, n, rec);
  }
  release_snapshot(snap);
  return out;
}

// discard(): drop every published record without building Python objects (benchmarks measure
// the recording alone with it).
PyObject* py_discard(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> dg(g_drain_mu);
  if (g_fast_active) return refuse_during_fast_drain();
  Snapshot snap;
  take_snapshot(snap, 0);
  release_snapshot(snap);
  Py_RETURN_NONE;
}

// ---- the fast drain: records applied to native shadow memory (shadow.h) -------------------
// A record goes to Python (returned, as drain() returns it) when it could race, or needs
// anything the Python engine alone does; every storage it touches is handed to Python first.
void release_weak_storage(void* p) {
  c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim(static_cast<c10::StorageImpl*>(p));
}
// Null: an access whose storage died and whose reference the reaper already dropped (below).
bool weak_storage_alive(void* p) {
  return p != nullptr && c10::raw::intrusive_ptr::use_count(static_cast<c10::StorageImpl*>(p)) > 0;
}

// ---- the reaper: references of pending records to storages that died ----------------------
// A pending record holds a weak reference to each storage it accessed until it is drained. A
// storage that dies meanwhile keeps its StorageImpl object (not its data) allocated between the
// target's freed chunks, which the C library then cannot merge: a one-thread training's peak
// RSS grew by 15-18 MB. A native thread (no GIL) drops those references soon after; the drain
// finds such an access dead, as it would have anyway (a storage that died stays dead).
// Every 1 ms while ops are recorded (one pass over ~1,000 pending records takes a few µs), every
// 50 ms while none are (an idle server's process should not wake 1,000 times a second).
constexpr auto kReapPeriod = std::chrono::milliseconds(1);
constexpr auto kIdleReapPeriod = std::chrono::milliseconds(50);
std::atomic<bool> g_reaper_stop{false};
std::atomic<bool> g_reaper_busy{false};
std::atomic<uint64_t> g_reaped{0};  // references dropped

// Under g_drain_mu (records are read and cleared as the drain's consumer, and no buffer is
// freed meanwhile); the references are dropped by the caller after it is released.
void collect_dead_pins(std::vector<c10::StorageImpl*>& dead) {
  std::unique_lock<std::mutex> dg(g_drain_mu, std::try_to_lock);
  if (!dg.owns_lock() || g_fast_active) return;  // a drain is under way: it releases them soon
  std::vector<ThreadBuf*> bufs;
  {
    std::lock_guard<std::mutex> g(g_mu);
    bufs.assign(g_bufs.begin(), g_bufs.end());
  }
  for (ThreadBuf* b : bufs) {
    const uint64_t h = b->op_head.load(std::memory_order_acquire);
    const uint64_t ocap = b->ops.size(), acap = b->accs.size();
    for (uint64_t i = b->op_tail.load(std::memory_order_relaxed); i < h; ++i) {
      const OpRec& r = b->ops[i % ocap];
      for (uint32_t j = 0; j < r.nacc + r.nout; ++j) {
        AccRec& a = b->accs[(r.acc_begin + j) % acap];
        if (a.storage != nullptr && !weak_storage_alive(a.storage)) {
          dead.push_back(a.storage);
          a.storage = nullptr;
        }
      }
    }
  }
}

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

void reaper_loop() {
  std::vector<c10::StorageImpl*> dead;
  uint64_t seen_seq = 0;
  for (;;) {
    const uint64_t seq = g_seq.load(std::memory_order_relaxed);
    std::this_thread::sleep_for(seq == seen_seq ? kIdleReapPeriod : kReapPeriod);
    seen_seq = seq;
    g_reaper_busy.store(true);  // then the stop flag: stop_reaper() sees one or the other
    if (g_reaper_stop.load() || interpreter_finalizing()) break;
    if (g_enabled.load(std::memory_order_relaxed)) {
      collect_dead_pins(dead);
      for (c10::StorageImpl* st : dead) c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim(st);  // may free it
      g_reaped.fetch_add(dead.size(), std::memory_order_relaxed);
      dead.clear();
    }
    g_reaper_busy.store(false);
  }
  g_reaper_busy.store(false);
}

// At exit, before the globals it reads are destroyed: stop the reaper and wait (bounded) for
// a pass in progress; it never blocks on anything the exiting thread might hold but g_mu.
void stop_reaper() {
  g_reaper_stop.store(true);
  for (int i = 0; i < 200 && g_reaper_busy.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void start_reaper() {
  if (g_reaper_started) return;
  g_reaper_started = true;
  static bool registered = false;
  if (!registered) {
    registered = true;
    std::atexit(&stop_reaper);
  }
  g_reaper_stop.store(false);
  g_reaper_busy.store(false);
  try {
    std::thread(&reaper_loop).detach();
  } catch (const std::exception&) {  // no thread: pending records keep their references until drained
  }
}

shadow::Table* g_table = new shadow::Table(&release_weak_storage, &weak_storage_alive);
PyObject* g_context_of = nullptr;  // key -> (timeline, clock list, context, one timeline) | False | None
PyObject* g_adopt = nullptr;       // hands a storage's shadow to the Python engine
PyObject* g_py_shadows = nullptr;  // the Python engine's shadows (a dict keyed by address)
Snapshot g_fast;                   // the snapshot being drained, across fast_drain() calls
size_t g_fast_pos = 0;
std::vector<uint8_t> g_python_part;  // what of the current record Python applies (empty: all)
uint64_t g_fast_ops = 0, g_fast_dead = 0, g_fast_unwatched = 0, g_fast_slow = 0;
uint64_t g_fast_mutex_failures = 0;  // a gradient mutex's release that failed (ordering lost)
std::unordered_map<int64_t, std::pair<const Plan*, uintptr_t>> g_prev_op;  // per thread key

struct KeyContext {
  int kind = 0;  // 0: Python decides, 1: a thread raceguard does not watch, 2: watched
  int64_t timeline = 0;
  std::vector<int64_t> clock;
  PyObject* ctx = nullptr;  // owned
  PyObject* clock_list = nullptr;  // owned: the Python engine's own clock of the timeline
  bool single = false;      // the session has one timeline (no mutex can order anything)
};
std::unordered_map<int64_t, KeyContext> g_contexts;  // valid until control returns to Python

void forget_contexts() {
  for (auto& kv : g_contexts) {
    Py_XDECREF(kv.second.ctx);
    Py_XDECREF(kv.second.clock_list);
  }
  g_contexts.clear();
}

KeyContext& context_of(int64_t key) {
  auto it = g_contexts.find(key);
  if (it != g_contexts.end()) return it->second;
  KeyContext kc;
  PyObject* k = PyLong_FromLongLong(key);
  PyObject* res = k ? PyObject_CallOneArg(g_context_of, k) : nullptr;
  Py_XDECREF(k);
  if (res == nullptr) {
    PyErr_Clear();  // Python's own path meets the same problem and reports it
  } else if (res == Py_False) {
    kc.kind = 1;
  } else if (PyTuple_Check(res) && PyTuple_GET_SIZE(res) >= 3 && PyList_Check(PyTuple_GET_ITEM(res, 1))) {
    kc.kind = 2;
    kc.timeline = PyLong_AsLongLong(PyTuple_GET_ITEM(res, 0));
    PyObject* clock = PyTuple_GET_ITEM(res, 1);
    kc.clock_list = clock;
    Py_INCREF(clock);
    kc.clock.resize(PyList_GET_SIZE(clock));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(clock); ++i) kc.clock[i] = PyLong_AsLongLong(PyList_GET_ITEM(clock, i));
    kc.ctx = PyTuple_GET_ITEM(res, 2);
    Py_INCREF(kc.ctx);
    kc.single = PyTuple_GET_SIZE(res) > 3 && PyTuple_GET_ITEM(res, 3) == Py_True;
    if (PyErr_Occurred()) {
      PyErr_Clear();
      kc.kind = 0;
    }
  }
  Py_XDECREF(res);
  return g_contexts.emplace(key, std::move(kc)).first->second;
}

bool in_python_shadows(uintptr_t key) {
  PyObject* k = PyLong_FromUnsignedLongLong(key);
  if (!k) return PyErr_Clear(), true;
  PyObject* found = PyDict_GetItemWithError(g_py_shadows, k);
  Py_DECREF(k);
  if (found == nullptr && PyErr_Occurred()) return PyErr_Clear(), true;
  return found != nullptr;
}

// Storage memory from the default CPU allocator (never shared between processes).
bool plain_cpu_memory(c10::StorageImpl* st) {
  static c10::DeleterFnPtr plain = c10::GetDefaultCPUAllocator()->raw_deleter();
  return plain != nullptr && st->data_ptr().get_deleter() == plain;
}

// Hands the entry of ``key`` (if any) to the Python engine. False with an exception set when
// the Python side failed (the entry is gone either way).
bool adopt(uintptr_t key) {
  shadow::Entry* e = g_table->take(key);
  if (e == nullptr) return true;
  bool ok = true;
  PyObject* storage = nullptr;
  if (e->weak == nullptr) {  // an entry made by the tests' shadow_access(): no storage behind it
    storage = Py_None;
    Py_INCREF(storage);
  } else {
    auto weak = c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim_copy(static_cast<c10::StorageImpl*>(e->weak));
    if (auto strong = weak.lock()) {  // (a storage that died needs no shadow)
      storage = THPStorage_Wrap(c10::Storage(std::move(strong)));
      ok = storage != nullptr;
    }
  }
  if (storage != nullptr) {
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(e->dtype)));
    PyObject* shape = new_tuple_of(e->shape.data(), static_cast<int>(e->shape.size()));
    PyObject* state = e->state_to_python();
    PyObject* res = nullptr;
    if (storage && shape && state)
      res = PyObject_CallFunction(g_adopt, "KOOOOON", (unsigned long long)key, storage, dtype, shape,
                                  e->alloc_site ? e->alloc_site : Py_None, e->seen_only ? Py_True : Py_False, state);
    else
      Py_XDECREF(state);
    Py_XDECREF(storage);
    Py_XDECREF(shape);
    ok = res != nullptr;
    Py_XDECREF(res);
  }
  g_table->destroy(e);
  return ok;
}

// The byte range of a tensor when torch_ops.byte_ranges gives exactly one (contiguous tensors,
// permutations of a dense block such as weight.t(), negative strides, broadcast dims, views with
// more runs than torch_ops.MAX_RUNS): false where it gives several (Python makes the access).
constexpr int64_t kMaxRuns = 4096;  // torch_ops.MAX_RUNS (tests/test_native_shadow.py compares)
bool single_range(const AccRec& a, int64_t& lo, int64_t& hi) {
  const int64_t es = a.itemsize;
  lo = a.offset * es;
  if (a.numel == 0) return (hi = lo), true;
  if (a.flags & F_CONTIG) return (hi = lo + a.numel * es), true;
  if (a.flags & F_TRUNCATED) return false;
  std::pair<int64_t, int64_t> dims[kMaxDims];  // (stride, size), size != 1
  int nd = 0;
  for (int d = 0; d < a.ndim; ++d)
    if (a.sizes[d] != 1) dims[nd++] = {a.strides[d], a.sizes[d]};
  std::stable_sort(dims, dims + nd, [](const auto& x, const auto& y) { return std::llabs(x.first) < std::llabs(y.first); });
  int64_t neg = 0, pos = 0;
  for (int d = 0; d < nd; ++d) (dims[d].first < 0 ? neg : pos) += dims[d].first * (dims[d].second - 1);
  if (std::any_of(dims, dims + nd, [](const auto& x) { return x.first < 0; })) {
    hi = lo + (pos + 1) * es;
    lo = lo + neg * es;
    return true;
  }
  int64_t run = 1;
  int k = 0;
  while (k < nd && dims[k].first == run) run *= dims[k++].second;
  const int64_t hull = (pos + 1) * es;
  bool zero_stride = false;
  int64_t n_runs = 1;
  for (int d = k; d < nd; ++d) {
    zero_stride = zero_stride || dims[d].first == 0;
    n_runs = std::min<int64_t>(n_runs * dims[d].second, kMaxRuns + 1);
  }
  if (k == nd || zero_stride || hull == a.numel * es || n_runs > kMaxRuns) return (hi = lo + hull), true;
  return false;
}

struct FastAccess {
  shadow::Entry* entry;  // null: a storage seen for the first time
  const AccRec* a;
  int64_t lo, hi;
};

constexpr uint32_t kMaxFastAccesses = 64;

enum class Verdict { Applied, Python, Dropped };

// A fresh entry for an access's storage (one more weak reference to it), described for naming.
shadow::Entry* storage_entry(const AccRec& a, PyObject* site, bool seen_only) {
  c10::raw::weak_intrusive_ptr::incref(a.storage);
  shadow::Entry* e = g_table->fresh(reinterpret_cast<uintptr_t>(a.storage), a.storage);
  e->describe(a.dtype, a.sizes, a.ndim, site, seen_only);
  return e;
}

// ---- gradients the engine installed (Namer.note_grad, for records applied natively) ------
// Which storage holds which parameter's gradient, so that naming can call it
// ``model.fc1.weight.grad`` without reading ``.grad``; and which parameters the engine
// accumulated into (naming never reads their ``.grad``: see Namer.note_installed_grads).
// Weak references keep the addresses from reuse. Used under the GIL only.
struct GradSpan {
  c10::TensorImpl* param;  // one weak reference
  int64_t lo, hi;
};
struct GradEntry {
  c10::StorageImpl* storage;  // one weak reference
  std::vector<GradSpan> spans;
};
std::unordered_map<uintptr_t, GradEntry> g_grad_spans;
std::unordered_set<c10::TensorImpl*> g_engine_params;  // one weak reference each
// Swept often: a dead gradient's StorageImpl object, pinned here by its weak reference, sat
// between the target's freed chunks and grew a two-thread training's peak RSS from 366 to 490 MB.
size_t g_next_grad_sweep = 64;

bool weak_tensor_alive(c10::TensorImpl* p) { return c10::raw::intrusive_ptr::use_count(p) > 0; }
void release_weak_tensor(c10::TensorImpl* p) { c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(p); }

void sweep_grad_notes() {
  for (auto it = g_grad_spans.begin(); it != g_grad_spans.end();) {
    if (weak_storage_alive(it->second.storage)) {
      ++it;
      continue;
    }
    for (const GradSpan& g : it->second.spans) release_weak_tensor(g.param);
    release_weak_storage(it->second.storage);
    it = g_grad_spans.erase(it);
  }
  for (auto it = g_engine_params.begin(); it != g_engine_params.end();) {
    if (weak_tensor_alive(*it)) {
      ++it;
      continue;
    }
    release_weak_tensor(*it);
    it = g_engine_params.erase(it);
  }
  g_next_grad_sweep = std::max<size_t>(64, 2 * (g_grad_spans.size() + g_engine_params.size()));
}

// Namer.note_grad for a gradient accumulation applied natively: the parameter is one the
// engine accumulates into; the op's result or first written argument is now its gradient.
void note_grad_natively(ThreadBuf* b, const OpRec& r) {
  const uint64_t acap = b->accs.size();
  if (g_engine_params.insert(r.param).second) c10::raw::weak_intrusive_ptr::incref(r.param);
  const AccRec* t = nullptr;
  if (r.plan->grad_kind == 1) {
    if (r.nout == 1) t = &b->accs[(r.acc_begin + r.nacc) % acap];
  } else if (r.plan->grad_kind == 2 && !r.plan->metadata_only) {
    for (uint32_t j = 0; j < r.nacc && t == nullptr; ++j) {
      const AccRec& a = b->accs[(r.acc_begin + j) % acap];
      if (weak_storage_alive(a.storage) && (a.flags & F_WRITE)) t = &a;
    }
  }
  if (t != nullptr && t->storage != nullptr && t->tensor != nullptr && weak_tensor_alive(t->tensor)) {
    const int64_t lo = t->offset * t->itemsize;
    const int64_t hi = lo + std::max<int64_t>(t->numel, 1) * t->itemsize;
    auto [it, fresh] = g_grad_spans.try_emplace(reinterpret_cast<uintptr_t>(t->storage));
    GradEntry& e = it->second;
    if (fresh) {
      c10::raw::weak_intrusive_ptr::incref(t->storage);
      e.storage = t->storage;
    }
    bool found = false;
    for (GradSpan& g : e.spans)
      if (g.param == r.param) g.lo = lo, g.hi = hi, found = true;
    if (!found) {
      c10::raw::weak_intrusive_ptr::incref(r.param);
      e.spans.push_back({r.param, lo, hi});
    }
  }
  if (g_grad_spans.size() + g_engine_params.size() > g_next_grad_sweep) sweep_grad_notes();
}

// ---- the engine's per-parameter accumulation mutex, as a lock of the Python engine --------
// AccumulateGrad runs under a mutex of its node: one accumulation into a parameter happens
// before the next, whatever thread runs it. Its clock (engine/hb.py's SyncVar) is kept here for
// both drains: acquire joins it into the timeline's clock, release joins the timeline's clock
// into it and advances the timeline, as HappensBefore.acquire/release do, on the Python
// engine's own clock list.
struct GradVar {
  std::vector<int64_t> clock;
  bool set = false;
};
std::unordered_map<c10::TensorImpl*, GradVar> g_grad_vars;  // one weak reference per key
size_t g_next_var_sweep = 1024;

GradVar& grad_var(c10::TensorImpl* param) {
  auto [it, fresh] = g_grad_vars.try_emplace(param);
  if (fresh) {
    c10::raw::weak_intrusive_ptr::incref(param);
    if (g_grad_vars.size() > g_next_var_sweep) {
      for (auto j = g_grad_vars.begin(); j != g_grad_vars.end();) {
        if (j->first != param && !weak_tensor_alive(j->first)) {
          release_weak_tensor(j->first);
          j = g_grad_vars.erase(j);
        } else {
          ++j;
        }
      }
      g_next_var_sweep = std::max<size_t>(1024, 2 * g_grad_vars.size());
    }
  }
  return it->second;
}

// False with a Python exception set.
bool list_set(PyObject* list, Py_ssize_t i, int64_t v) {
  while (PyList_GET_SIZE(list) <= i) {
    PyObject* zero = PyLong_FromLong(0);
    if (zero == nullptr || PyList_Append(list, zero) < 0) return Py_XDECREF(zero), false;
    Py_DECREF(zero);
  }
  PyObject* value = PyLong_FromLongLong(v);
  return value != nullptr && PyList_SetItem(list, i, value) == 0;
}

bool grad_acquire(const GradVar& var, PyObject* clock) {
  if (!var.set) return true;
  for (size_t i = 0; i < var.clock.size(); ++i) {
    const int64_t mine = static_cast<Py_ssize_t>(i) < PyList_GET_SIZE(clock) ? PyLong_AsLongLong(PyList_GET_ITEM(clock, i)) : 0;
    if (var.clock[i] > mine && !list_set(clock, static_cast<Py_ssize_t>(i), var.clock[i])) return false;
  }
  return !PyErr_Occurred();
}

bool grad_release(GradVar& var, PyObject* clock, int64_t timeline) {
  const Py_ssize_t n = PyList_GET_SIZE(clock);
  if (var.clock.size() < static_cast<size_t>(n)) var.clock.resize(n, 0);
  for (Py_ssize_t i = 0; i < n; ++i) var.clock[i] = std::max<int64_t>(var.clock[i], PyLong_AsLongLong(PyList_GET_ITEM(clock, i)));
  var.set = true;
  if (PyErr_Occurred()) return false;
  const int64_t mine = timeline < n ? PyLong_AsLongLong(PyList_GET_ITEM(clock, timeline)) : 0;
  return list_set(clock, timeline, mine + 1);
}

// The context's copy of its clock, after the Python list changed.
bool refresh_clock(KeyContext& kc) {
  const Py_ssize_t n = PyList_GET_SIZE(kc.clock_list);
  kc.clock.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) kc.clock[i] = PyLong_AsLongLong(PyList_GET_ITEM(kc.clock_list, i));
  return !PyErr_Occurred();
}

// Applies what it can of the record natively. Python: the record (when ``python`` is empty) or
// the accesses and outputs flagged in ``python`` must be applied by Python, right after the
// ones applied here (nothing else runs in between).
Verdict apply_fast(ThreadBuf* b, const OpRec& r, int shared_mode, std::vector<uint8_t>& python) {
  python.clear();
  g_table->maybe_sweep();  // here, before this record holds any entry
  const uint64_t acap = b->accs.size();
  auto acc_at = [&](uint32_t j) -> const AccRec& { return b->accs[(r.acc_begin + j) % acap]; };
  const uintptr_t first = r.nacc + r.nout ? reinterpret_cast<uintptr_t>(acc_at(0).storage) : 0;
  auto& prev = g_prev_op[b->key];
  const auto before = prev;
  prev = {r.plan, first};
  // torch.tensor()'s own detach_ of the copy its lift_fresh just made: no dispatch mode sees it.
  if (r.plan->is_detach && before.first != nullptr && before.first->is_lift && before.second == first)
    return Verdict::Dropped;
  // What only Python does for a whole record: gradient accumulation (the parameter's mutex and
  // naming), fresh-input ops, TorchScript sites, threads it has not named yet, shared memory.
  // (A random draw goes to the hazards in Python, with just the accesses that need Python: the
  // hazards change no clock and no tensor's shadow.)
  if (r.plan->fresh_input || shared_mode == 2 || r.nacc + r.nout > kMaxFastAccesses) return Verdict::Python;
  const uint64_t fcap = b->frames.size();
  for (uint32_t j = 0; j < r.nframes; ++j)
    if (b->frames[(r.frame_begin + j) % fcap].code == nullptr) return Verdict::Python;
  KeyContext& kc = context_of(b->key);
  if (kc.kind == 0) return Verdict::Python;
  if (kc.kind == 1) {
    ++g_fast_unwatched;
    return Verdict::Dropped;
  }
  const shadow::Clock clock{kc.clock.data(), kc.clock.size()};
  const int64_t epoch = clock.at(kc.timeline);
  // The site before any entry of this record is held: making its tuple may run the garbage
  // collector, whose finalizers are Python code that may hand a storage to Python (take()).
  struct OwnedRef {
    PyObject* p;
    ~OwnedRef() { Py_XDECREF(p); }
  } site{site_tuple(b, r)};
  if (site.p == nullptr) {
    PyErr_Clear();
    return Verdict::Python;
  }
  python.assign(r.nacc + r.nout, 0);
  bool any_python = r.draws;
  FastAccess accesses[kMaxFastAccesses];
  uint32_t n = 0;
  uint64_t dead = 0;
  if (!r.plan->metadata_only) {
    for (uint32_t j = 0; j < r.nacc; ++j) {
      const AccRec& a = acc_at(j);
      if (!weak_storage_alive(a.storage)) {
        ++dead;
        continue;
      }
      const uintptr_t key = reinterpret_cast<uintptr_t>(a.storage);
      bool twice = false;  // one storage twice in an op: Python makes both accesses, in order
      for (uint32_t k = 0; k < j; ++k)
        if (acc_at(k).storage == a.storage) {
          twice = true;
          if (!python[k]) python[k] = 1, any_python = true;
        }
      int64_t lo = 0, hi = 0;
      shadow::Entry* e = nullptr;
      bool native = !twice && single_range(a, lo, hi) && !in_python_shadows(key) &&
                    (shared_mode == 0 || plain_cpu_memory(a.storage));
      if (native) {
        e = g_table->find(key);
        native = e == nullptr || e->fits(lo, hi, kc.timeline, epoch, clock, a.flags & F_WRITE);
      }
      if (!native) {
        python[j] = 1;
        any_python = true;
        continue;
      }
      accesses[n++] = {e, &a, lo, hi};
    }
    if (any_python) {  // drop the native half of a storage that appears twice
      uint32_t kept = 0;
      for (uint32_t k = 0; k < n; ++k) {
        bool flagged = false;
        for (uint32_t i = 0; i < r.nacc && !flagged; ++i) flagged = python[i] && acc_at(i).storage == accesses[k].a->storage;
        if (!flagged) accesses[kept++] = accesses[k];
      }
      n = kept;
    }
  }
  const AccRec* created[kMaxFastAccesses];
  uint32_t ncreated = 0;
  for (uint32_t j = r.nacc; j < r.nacc + r.nout; ++j) {
    const AccRec& a = acc_at(j);
    if (!weak_storage_alive(a.storage)) continue;
    bool known = false;  // an input's storage, or a second output in the same new storage
    for (uint32_t k = 0; k < r.nacc && !known; ++k) known = !r.plan->metadata_only && acc_at(k).storage == a.storage;
    for (uint32_t k = 0; k < ncreated && !known; ++k) known = created[k]->storage == a.storage;
    if (known) continue;
    const uintptr_t key = reinterpret_cast<uintptr_t>(a.storage);
    if (in_python_shadows(key)) {
      python[j] = 1;
      any_python = true;
      continue;
    }
    if (g_table->find(key) != nullptr) continue;  // not new memory
    created[ncreated++] = &a;
  }
  if (r.param != nullptr && any_python) {  // Python names the gradient: it makes every access
    python.clear();
    return Verdict::Python;
  }
  // A gradient accumulation holds its parameter's mutex (which orders nothing while the
  // session has one timeline, as in the Python engine): the accesses come after the last
  // accumulation into the parameter on any thread. (The acquire never raises the timeline's own
  // entry: the epoch stays.)
  GradVar* var = nullptr;
  if (r.param != nullptr && !kc.single) {
    var = &grad_var(r.param);
    if (!grad_acquire(*var, kc.clock_list) || !refresh_clock(kc)) {
      PyErr_Clear();
      python.clear();
      return Verdict::Python;  // (a join that was made is harmless: Python acquires again)
    }
  }
  const shadow::Clock held{kc.clock.data(), kc.clock.size()};
  if (n + ncreated > 0) {  // remember them as hb.py would
    shadow::Access rec(kc.timeline, epoch, r.plan->id, false, false, site.p, kc.ctx);
    for (uint32_t k = 0; k < n; ++k) {
      const FastAccess& fa = accesses[k];
      // first sight: hb.py's seen_only StorageMeta, no interval yet
      shadow::Entry* e = fa.entry != nullptr ? fa.entry : storage_entry(*fa.a, rec.site, true);
      rec.write = fa.a->flags & F_WRITE;
      e->apply(fa.lo, fa.hi, rec, held);
    }
    rec.write = true;
    rec.creates = true;
    for (uint32_t k = 0; k < ncreated; ++k) {
      const AccRec& a = *created[k];
      // (alive: checked above; the StorageImpl itself is kept by the record's weak reference,
      // and no strong one is taken: the target's last release must stay the target's)
      storage_entry(a, rec.site, false)->create(static_cast<int64_t>(a.storage->nbytes()), rec);
    }
  }
  g_fast_dead += dead;
  if (any_python) return Verdict::Python;  // Python counts the op
  if (r.param != nullptr) note_grad_natively(b, r);
  if (var != nullptr && (!grad_release(*var, kc.clock_list, kc.timeline) || !refresh_clock(kc))) {
    PyErr_Clear();  // the Python engine's clock may be half advanced: counted as ordering lost
    ++g_fast_mutex_failures;
  }
  ++g_fast_ops;
  return Verdict::Applied;
}

// configure_fast(context_of, adopt, shadows): the session's callbacks for fast_drain().
// What the drains kept for a session: its native memory, gradient notes, accumulation
// mutexes (whose clocks are indexed by that session's timelines) and thread contexts. A new
// session starts without them. Under g_drain_mu, outside a fast drain.
void forget_session_state() {
  g_table->clear();
  for (auto& kv : g_grad_spans) {
    for (const GradSpan& g : kv.second.spans) release_weak_tensor(g.param);
    release_weak_storage(kv.second.storage);
  }
  g_grad_spans.clear();
  for (c10::TensorImpl* p : g_engine_params) release_weak_tensor(p);
  g_engine_params.clear();
  for (auto& kv : g_grad_vars) release_weak_tensor(kv.first);
  g_grad_vars.clear();
  forget_contexts();
}

PyObject* py_configure_fast(PyObject*, PyObject* args) {
  PyObject *context, *adopt_fn, *shadows;
  if (!PyArg_ParseTuple(args, "OOO!", &context, &adopt_fn, &PyDict_Type, &shadows)) return nullptr;
  if (g_fast_active) return refuse_during_fast_drain();
  {
    std::lock_guard<std::mutex> dg(g_drain_mu);
    forget_session_state();
  }
  Py_INCREF(context);
  Py_INCREF(adopt_fn);
  Py_INCREF(shadows);
  Py_XSETREF(g_context_of, context);
  Py_XSETREF(g_adopt, adopt_fn);
  Py_XSETREF(g_py_shadows, shadows);
  Py_RETURN_NONE;
}

// fast_drain(shared_mode) -> the next record Python must apply (as drain() gives it), having
// applied every record before it natively; None when every published record is applied.
// shared_mode: 0 no shared memory in play, 1 storages not from the default CPU allocator go to
// Python, 2 every record goes to Python. Needs the GIL.
PyObject* py_fast_drain(PyObject*, PyObject* arg) {
  const long shared_mode = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (g_context_of == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "configure_fast() was not called");
    return nullptr;
  }
  if (!g_reaper_started && g_enabled.load()) start_reaper();  // a forked child's
  std::unique_lock<std::mutex> dg(g_drain_mu, std::try_to_lock);
  if (!dg.owns_lock()) Py_RETURN_NONE;  // another thread is draining
  if (!g_fast_active) {
    take_snapshot(g_fast, 0);
    g_fast_pos = 0;
    g_fast_active = true;
  }
  while (g_fast_pos < g_fast.items.size()) {
    const DrainItem& item = g_fast.items[g_fast_pos++];
    ThreadBuf* b = item.b;
    const OpRec& r = b->ops[item.idx % b->ops.size()];
    if (apply_fast(b, r, static_cast<int>(shared_mode), g_python_part) != Verdict::Python) continue;
    ++g_fast_slow;
    forget_contexts();  // Python may change clocks, locks and threads before the next call
    bool ok = true;
    for (uint32_t j = 0; j < r.nacc + r.nout; ++j)
      if (g_python_part.empty() || g_python_part[j])
        ok = adopt(reinterpret_cast<uintptr_t>(b->accs[(r.acc_begin + j) % b->accs.size()].storage)) && ok;
    if (!ok) return nullptr;  // this record is lost (counted by the caller's failure report)
    return record_tuple(b, r, g_python_part);
  }
  forget_contexts();
  release_snapshot(g_fast);
  g_fast_active = false;
  Py_RETURN_NONE;
}

// pending() -> whether a drain has anything to do (published records, or a snapshot under way).
// Cheap: the session's lock asks it every time it is taken.
PyObject* py_pending(PyObject*, PyObject*) {
  if (g_fast_active) Py_RETURN_TRUE;
  std::lock_guard<std::mutex> g(g_mu);
  for (ThreadBuf* b : g_bufs)
    if (b->op_head.load(std::memory_order_acquire) != b->op_tail.load(std::memory_order_relaxed)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// take(address) -> whether a native shadow was handed to Python (the Python engine's shadows
// ask for it when they miss).
PyObject* py_take(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  if (g_table->find(static_cast<uintptr_t>(key)) == nullptr) Py_RETURN_FALSE;
  if (!adopt(static_cast<uintptr_t>(key))) return nullptr;
  Py_RETURN_TRUE;
}

// ---- the same transitions, driven without torch (tests/test_native_shadow.py) -------------
// shadow_access(address, lo, hi, is_write, timeline, clock, site, plan, ctx) -> True when the
// access was applied natively, False when the Python engine must make it (nothing changed).
PyObject* py_shadow_access(PyObject*, PyObject* args) {
  unsigned long long key;
  long long lo, hi, tl, plan;
  int is_write;
  PyObject *clock_list, *site, *ctx;
  if (!PyArg_ParseTuple(args, "KLLpLO!OLO", &key, &lo, &hi, &is_write, &tl, &PyList_Type, &clock_list, &site, &plan,
                        &ctx))
    return nullptr;
  std::vector<int64_t> values(PyList_GET_SIZE(clock_list));
  for (size_t i = 0; i < values.size(); ++i) values[i] = PyLong_AsLongLong(PyList_GET_ITEM(clock_list, i));
  if (PyErr_Occurred()) return nullptr;
  const shadow::Clock clock{values.data(), values.size()};
  const int64_t epoch = clock.at(tl);
  if (g_py_shadows != nullptr && in_python_shadows(key)) Py_RETURN_FALSE;
  shadow::Entry* e = g_table->find(key);
  if (e != nullptr && !e->fits(lo, hi, tl, epoch, clock, is_write)) Py_RETURN_FALSE;
  if (e == nullptr) {
    e = g_table->fresh(key, nullptr);
    e->describe(0, nullptr, 0, site, true);
  }
  e->apply(lo, hi, shadow::Access(tl, epoch, plan, is_write, false, site, ctx), clock);
  Py_RETURN_TRUE;
}

// byte_range(tensor) -> (lo, hi) where the fast drain decides the tensor's accesses as one byte
// range, else None.
PyObject* py_byte_range(PyObject*, PyObject* arg) {
  if (!THPVariable_Check(arg)) return PyErr_SetString(PyExc_TypeError, "a tensor"), nullptr;
  const at::Tensor& t = THPVariable_Unpack(arg);
  AccRec a{};
  a.offset = t.storage_offset();
  a.numel = t.numel();
  a.itemsize = static_cast<int32_t>(t.itemsize());
  const size_t nd = std::min<size_t>(t.dim(), kMaxDims);
  a.ndim = static_cast<uint8_t>(nd);
  for (size_t d = 0; d < nd; ++d) {
    a.sizes[d] = t.sizes()[d];
    a.strides[d] = t.strides()[d];
  }
  a.flags = (t.is_contiguous() ? F_CONTIG : 0) | (static_cast<size_t>(t.dim()) > kMaxDims ? F_TRUNCATED : 0);
  int64_t lo = 0, hi = 0;
  if (!single_range(a, lo, hi)) Py_RETURN_NONE;
  return Py_BuildValue("(LL)", (long long)lo, (long long)hi);
}

// shadow_create(address, nbytes, timeline, epoch, site, plan, ctx): new memory, as a fresh output.
PyObject* py_shadow_create(PyObject*, PyObject* args) {
  unsigned long long key;
  long long nbytes, tl, epoch, plan;
  PyObject *site, *ctx;
  if (!PyArg_ParseTuple(args, "KLLLOLO", &key, &nbytes, &tl, &epoch, &site, &plan, &ctx)) return nullptr;
  shadow::Entry* e = g_table->fresh(key, nullptr);
  e->describe(0, nullptr, 0, site, false);
  e->create(nbytes, shadow::Access(tl, epoch, plan, true, true, site, ctx));
  Py_RETURN_NONE;
}

// shadow_drop(address): the memory died.
PyObject* py_shadow_drop(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (shadow::Entry* e = g_table->take(key)) g_table->destroy(e);
  Py_RETURN_NONE;
}

// An access tuple (timeline, epoch, is_write, creates, site, plan, ctx), as Access::to_python
// makes it, back into an Access. False with an exception set when it is not one.
bool access_from_python(PyObject* t, shadow::Access& out) {
  long long tl, epoch, plan;
  int is_write, creates;
  PyObject *site, *ctx;
  if (!PyArg_ParseTuple(t, "LLppOLO", &tl, &epoch, &is_write, &creates, &site, &plan, &ctx)) return false;
  out = shadow::Access(tl, epoch, plan, is_write, creates, site, ctx);
  return true;
}

// give(address, storage, dtype, shape, alloc_site, seen_only, (lo, hi, write, reads)) -> True:
// the Python engine hands a storage's one-interval shadow back to the fast drain (adopt's
// inverse; False leaves it with Python).
PyObject* py_give(PyObject*, PyObject* args) {
  unsigned long long key;
  PyObject *storage, *dtype, *shape, *site, *state;
  int seen_only;
  if (!PyArg_ParseTuple(args, "KOOO!OpO!", &key, &storage, &dtype, &PyTuple_Type, &shape, &site, &seen_only,
                        &PyTuple_Type, &state))
    return nullptr;
  if ((storage != Py_None && !THPStorage_Check(storage)) || !THPDtype_Check(dtype) || PyTuple_GET_SIZE(state) != 4 ||
      PyTuple_GET_SIZE(shape) > kMaxDims)
    Py_RETURN_FALSE;
  PyObject *lo = PyTuple_GET_ITEM(state, 0), *hi = PyTuple_GET_ITEM(state, 1);
  PyObject *write = PyTuple_GET_ITEM(state, 2), *reads = PyTuple_GET_ITEM(state, 3);
  auto e = std::make_unique<shadow::Entry>();
  if (lo != Py_None) {
    e->has_interval = true;
    e->lo = PyLong_AsLongLong(lo);
    e->hi = PyLong_AsLongLong(hi);
  }
  if (write != Py_None && !access_from_python(write, e->write)) return nullptr;
  if (PyList_Check(reads)) {
    e->reads_per_timeline = true;
    e->reads.resize(PyList_GET_SIZE(reads));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(reads); ++i)
      if (!access_from_python(PyList_GET_ITEM(reads, i), e->reads[i])) return nullptr;
  } else if (reads != Py_None) {
    e->reads.resize(1);
    if (!access_from_python(reads, e->reads[0])) return nullptr;
  }
  int64_t sizes[kMaxDims];
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); ++i) sizes[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
  if (PyErr_Occurred()) return nullptr;
  e->describe(static_cast<int8_t>(reinterpret_cast<THPDtype*>(dtype)->scalar_type), sizes, PyTuple_GET_SIZE(shape),
              site, seen_only);
  c10::StorageImpl* st = nullptr;  // None: the tests' synthetic memory, as shadow_access makes
  if (storage != Py_None) {
    st = THPStorage_Unpack(storage).unsafeGetStorageImpl();
    if (reinterpret_cast<uintptr_t>(st) != key) Py_RETURN_FALSE;
    c10::raw::weak_intrusive_ptr::incref(st);
  }
  e->weak = st;
  g_table->place(key, e.release());
  Py_RETURN_TRUE;
}

// fast_counts() -> (ops applied natively, dead accesses, ops of unwatched threads, records sent
// to Python, native shadows, gradient mutex releases that failed): all but the shadows are reset.
PyObject* py_fast_counts(PyObject*, PyObject*) {
  PyObject* out = Py_BuildValue("(KKKKKK)", (unsigned long long)g_fast_ops, (unsigned long long)g_fast_dead,
                                (unsigned long long)g_fast_unwatched, (unsigned long long)g_fast_slow,
                                (unsigned long long)g_table->size(), (unsigned long long)g_fast_mutex_failures);
  g_fast_ops = g_fast_dead = g_fast_unwatched = g_fast_slow = g_fast_mutex_failures = 0;
  return out;
}

// script_frame(id) -> (file, line, function) of an interned TorchScript frame
PyObject* py_script_frame(PyObject*, PyObject* arg) {
  long id = PyLong_AsLong(arg);
  if (PyErr_Occurred()) return nullptr;
  std::lock_guard<std::mutex> g(g_script_mu);
  if (id < 0 || id >= static_cast<long>(g_script_frames.size())) {
    PyErr_SetString(PyExc_IndexError, "no such script frame");
    return nullptr;
  }
  const auto& f = g_script_frames[id];
  return Py_BuildValue("(sLs)", std::get<0>(f).c_str(), (long long)std::get<1>(f), std::get<2>(f).c_str());
}

// plan(id) -> (name, metadata_only, fresh_input)
PyObject* py_plan(PyObject*, PyObject* arg) {
  long long id = PyLong_AsLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  Plan* p;
  {
    std::lock_guard<std::mutex> g(g_plan_mu);
    if (id < 0 || id >= static_cast<long long>(g_plan_list.size())) {
      PyErr_SetString(PyExc_IndexError, "no such plan");
      return nullptr;
    }
    p = g_plan_list[id];
  }
  return Py_BuildValue("(sOO)", p->name.c_str(), p->metadata_only ? Py_True : Py_False,
                       p->fresh_input ? Py_True : Py_False);
}

// configure_grad_ops(result_ops, inplace_ops): naming's _GRAD_RESULT_OPS and _GRAD_INPLACE_OPS
// (base names). Call before install: plans already built keep what they were built with.
PyObject* py_configure_grad_ops(PyObject*, PyObject* args) {
  PyObject *result_ops, *inplace_ops;
  if (!PyArg_ParseTuple(args, "OO", &result_ops, &inplace_ops)) return nullptr;
  std::lock_guard<std::mutex> g(g_plan_mu);
  for (auto [src, dst] : {std::pair{result_ops, &g_grad_result_ops}, std::pair{inplace_ops, &g_grad_inplace_ops}}) {
    PyObject* it = PyObject_GetIter(src);
    if (!it) return nullptr;
    while (PyObject* item = PyIter_Next(it)) {
      const char* name = PyUnicode_AsUTF8(item);
      if (name) dst->insert(name);
      Py_DECREF(item);
    }
    Py_DECREF(it);
  }
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_NONE;
}

// grad_spans(storage address) -> [(parameter, lo, hi)]: the live parameters whose gradient a
// natively applied accumulation put in that storage, and where (Namer._noted_grads).
PyObject* py_grad_spans(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  auto it = g_grad_spans.find(static_cast<uintptr_t>(key));
  if (it == g_grad_spans.end() || !weak_storage_alive(it->second.storage)) return out;
  for (const GradSpan& g : it->second.spans) {
    PyObject* param = tensor_or_none(g.param);
    if (param == nullptr) return Py_DECREF(out), nullptr;
    if (param == Py_None) {
      Py_DECREF(param);
      continue;
    }
    PyObject* item = Py_BuildValue("(NLL)", param, (long long)g.lo, (long long)g.hi);
    if (item == nullptr || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return out;
}

// engine_param(tensor address) -> whether a natively applied accumulation went into that
// parameter (its TensorImpl, Tensor._cdata) while it lives.
PyObject* py_engine_param(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  auto* p = reinterpret_cast<c10::TensorImpl*>(static_cast<uintptr_t>(key));
  return PyBool_FromLong(g_engine_params.count(p) && weak_tensor_alive(p));
}

// grad_mutex(parameter address, clock list, timeline, release): HappensBefore.acquire (release
// False) or release (True) of the parameter's accumulation mutex on ``clock list``, the
// timeline's own clock in the Python engine (its records applied by Python).
PyObject* py_grad_mutex(PyObject*, PyObject* args) {
  unsigned long long key;
  PyObject* clock;
  long long timeline;
  int release;
  if (!PyArg_ParseTuple(args, "KO!Lp", &key, &PyList_Type, &clock, &timeline, &release)) return nullptr;
  GradVar& var = grad_var(reinterpret_cast<c10::TensorImpl*>(static_cast<uintptr_t>(key)));
  if (!(release ? grad_release(var, clock, timeline) : grad_acquire(var, clock))) return nullptr;
  Py_RETURN_NONE;
}

// Waits (without the GIL) until a buffer is 1/16 full or ``timeout`` seconds passed.
PyObject* py_wait(PyObject*, PyObject* arg) {
  double timeout = PyFloat_AsDouble(arg);
  if (PyErr_Occurred()) return nullptr;
  bool woken;
  Py_BEGIN_ALLOW_THREADS;
  std::unique_lock<std::mutex> lk(g_wake_mu);
  woken = g_wake.wait_for(lk, std::chrono::duration<double>(timeout), [] { return g_wake_pending.load(); });
  g_wake_pending.store(false);
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(woken);
}

PyObject* py_wake(PyObject*, PyObject*) {
  wake_drainer();
  Py_RETURN_NONE;
}

// stats() -> (lost records, frames cut short because a code object could not be pinned,
// native threads seen)
PyObject* py_stats(PyObject*, PyObject*) {
  return Py_BuildValue("(KKL)", (unsigned long long)g_lost_total.load(), (unsigned long long)g_unpinned.load(),
                       (long long)g_native_threads.load());
}

PyObject* py_reaped(PyObject*, PyObject*) { return PyLong_FromUnsignedLongLong(g_reaped.load()); }

PyObject* py_thread_key(PyObject*, PyObject*) { return PyLong_FromLongLong(buf()->key); }

// suspend() / resume(): the calling thread's ops are not recorded in between (nestable): torch
// turns every dispatch mode off while Dynamo compiles, so the Python mode sees none of them.
PyObject* py_suspend(PyObject*, PyObject*) {
  ++buf()->depth;  // as inside a recorded op: nested ops are invisible
  Py_RETURN_NONE;
}

PyObject* py_resume(PyObject*, PyObject*) {
  ThreadBuf* b = buf();
  if (b->depth > 0) --b->depth;
  Py_RETURN_NONE;
}

PyMethodDef g_methods[] = {
    {"tick", (PyCFunction)(void (*)(void))py_tick, METH_FASTCALL, "tick() -> the next global sequence number"},
    {"install", py_install, METH_VARARGS,
     "install(metadata_only, fresh_input, undeclared, cap_ops, cap_accesses, cap_frames): start recording"},
    {"configure_rng", py_configure_rng, METH_O,
     "configure_rng({op: draw condition or None}): the ops that draw from a random generator"},
    {"configure_grad_ops", py_configure_grad_ops, METH_VARARGS,
     "configure_grad_ops(result_ops, inplace_ops): the ops that install a parameter's gradient"},
    {"current_site", py_current_site, METH_NOARGS, "current_site() -> the calling thread's stack as an op's site"},
    {"grad_mutex", py_grad_mutex, METH_VARARGS, "grad_mutex(parameter address, clock, timeline, release)"},
    {"grad_spans", py_grad_spans, METH_O, "grad_spans(storage address) -> [(parameter, lo, hi)]"},
    {"engine_param", py_engine_param, METH_O, "engine_param(tensor address) -> accumulated into natively"},
    {"pause", py_pause, METH_NOARGS, "pause(): stop recording (the observer stays registered, disabled)"},
    {"recording", py_recording, METH_NOARGS, "recording() -> whether ops are recorded (installed, not paused)"},
    {"drain", (PyCFunction)(void (*)(void))py_drain, METH_FASTCALL, "drain([limit_seq]) -> records, sorted"},
    {"script_frame", py_script_frame, METH_O, "script_frame(id) -> (file, line, function)"},
    {"discard", py_discard, METH_NOARGS, "discard(): drop every published record"},
    {"configure_fast", py_configure_fast, METH_VARARGS,
     "configure_fast(context_of, adopt, shadows): a new session's callbacks for fast_drain(); forgets the last one's state"},
    {"fast_drain", py_fast_drain, METH_O, "fast_drain(shared_mode) -> the next record for Python, or None"},
    {"pending", py_pending, METH_NOARGS, "pending() -> whether a drain has anything to do"},
    {"take", py_take, METH_O, "take(address) -> whether a native shadow was handed to Python"},
    {"give", py_give, METH_VARARGS, "give(address, storage, dtype, shape, site, seen_only, state) -> taken back"},
    {"shadow_access", py_shadow_access, METH_VARARGS, "shadow_access(...) -> applied natively (tests)"},
    {"byte_range", py_byte_range, METH_O, "byte_range(tensor) -> (lo, hi) if the fast drain takes it as one"},
    {"shadow_create", py_shadow_create, METH_VARARGS, "shadow_create(...): new memory (tests)"},
    {"shadow_drop", py_shadow_drop, METH_O, "shadow_drop(address): the memory died (tests)"},
    {"fast_counts", py_fast_counts, METH_NOARGS, "fast_counts() -> (ops, dead, unwatched, to Python, shadows, mutex failures)"},
    {"plan", py_plan, METH_O, "plan(id) -> (name, metadata_only, fresh_input)"},
    {"wait", py_wait, METH_O, "wait(timeout) -> whether a producer asked for a drain"},
    {"wake", py_wake, METH_NOARGS, "wake(): end a wait()"},
    {"stats", py_stats, METH_NOARGS, "stats() -> (lost records, cut stacks, native threads)"},
    {"reaped", py_reaped, METH_NOARGS, "reaped() -> references of pending records to dead storages dropped early"},
    {"thread_key", py_thread_key, METH_NOARGS, "thread_key() -> the calling thread's key in records"},
    {"suspend", py_suspend, METH_NOARGS, "suspend(): record none of the calling thread's ops until resume()"},
    {"resume", py_resume, METH_NOARGS, "resume(): undo one suspend() of the calling thread"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, "raceguard_native_recorder", nullptr, -1, g_methods};

}  // namespace

PyMODINIT_FUNC PyInit__raceguard_recorder() { return PyModule_Create(&g_module); }
