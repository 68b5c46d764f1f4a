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
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
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

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

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

struct ThreadBuf {
  int64_t key = 0;  // Python thread ident (> 0) or -(native index)
  bool exited = false;
  // single producer (the thread), single consumer (the drainer, under g_drain_mu)
  std::atomic<uint64_t> op_head{0}, op_tail{0};
  uint64_t acc_head = 0, frame_head = 0;  // producer-private; published with op_head
  std::atomic<uint64_t> acc_tail{0}, frame_tail{0};
  std::vector<OpRec> ops;
  std::vector<AccRec> accs;
  std::vector<FrameRec> frames;
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

inline ThreadBuf* buf() {
  ThreadBuf* b = t_owner.buf;
  if (C10_LIKELY(b != nullptr)) return b;
  b = new ThreadBuf();
  b->ops.resize(g_cap_ops);
  b->accs.resize(g_cap_accs);
  b->frames.resize(g_cap_frames);
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

inline void publish(ThreadBuf* b) {
  b->open = false;
  const uint64_t h = b->op_head.load(std::memory_order_relaxed) + 1;
  b->op_head.store(h, std::memory_order_release);
  const uint64_t used = h - b->op_tail.load(std::memory_order_relaxed);
  if (used * 2 > b->ops.size() || (b->acc_head - b->acc_tail.load(std::memory_order_relaxed)) * 2 > b->accs.size())
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
  // Held only with the GIL, which the forking thread has: no other thread was draining.
  new (&g_drain_mu) std::mutex();
  new (&g_wake_mu) std::mutex();
  new (&g_wake) std::condition_variable();
}

// ---- Python interface ---------------------------------------------------------------------
PyObject* py_tick(PyObject*, PyObject* const*, Py_ssize_t) {
  return PyLong_FromUnsignedLongLong(g_seq.fetch_add(1, std::memory_order_relaxed));
}

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

PyObject* new_tuple_of(const int64_t* v, int n) {
  PyObject* t = PyTuple_New(n);
  for (int i = 0; i < n; ++i) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v[i]));
  return t;
}

// One access as (storage or None, storage address, flags, dtype, shape, offset, itemsize,
// numel, strides, tensor or None).
PyObject* access_tuple(const AccRec& a) {
  PyObject* storage = Py_None;
  Py_INCREF(Py_None);
  auto weak = c10::weak_intrusive_ptr<c10::StorageImpl>::reclaim_copy(a.storage);
  if (auto strong = weak.lock()) {
    Py_DECREF(Py_None);
    storage = THPStorage_Wrap(c10::Storage(std::move(strong)));
  }
  PyObject* tensor = Py_None;
  Py_INCREF(Py_None);
  if (a.tensor) {
    auto wt = c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim_copy(a.tensor);
    if (auto st = wt.lock()) {
      Py_DECREF(Py_None);
      tensor = THPVariable_Wrap(at::Tensor(std::move(st)));
    }
  }
  PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(a.dtype)));
  Py_INCREF(dtype);
  return Py_BuildValue("(NKiNNLiLNN)", storage, (unsigned long long)reinterpret_cast<uintptr_t>(a.storage),
                       (int)a.flags, dtype, new_tuple_of(a.sizes, a.ndim), (long long)a.offset, (int)a.itemsize,
                       (long long)a.numel, new_tuple_of(a.strides, a.ndim), tensor);
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

// drain(limit_seq) -> [(seq, thread key, plan id, backward, site, accesses, outputs, param, draw)]
// for every published record with seq < limit_seq (all when 0), sorted by seq. Needs the GIL.
PyObject* py_drain(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  unsigned long long limit = nargs > 0 ? PyLong_AsUnsignedLongLong(args[0]) : 0;
  if (PyErr_Occurred()) return nullptr;
  std::unique_lock<std::mutex> dg(g_drain_mu, std::try_to_lock);
  if (!dg.owns_lock()) return PyList_New(0);  // another thread is draining
  std::vector<ThreadBuf*> bufs;
  {
    std::lock_guard<std::mutex> g(g_mu);
    bufs = g_bufs;
  }
  struct Item {
    uint64_t seq;
    ThreadBuf* b;
    uint64_t idx;
  };
  std::vector<Item> items;
  std::vector<uint64_t> heads(bufs.size());
  for (size_t k = 0; k < bufs.size(); ++k) {
    ThreadBuf* b = bufs[k];
    uint64_t h = b->op_head.load(std::memory_order_acquire);
    uint64_t t = b->op_tail.load(std::memory_order_relaxed);
    uint64_t i = t;
    for (; i < h; ++i) {
      const OpRec& r = b->ops[i % b->ops.size()];
      if (limit && r.seq >= limit) break;
      items.push_back({r.seq, b, i});
    }
    heads[k] = i;
  }
  std::sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.seq < y.seq; });
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(items.size()));
  if (!out) return nullptr;
  for (size_t n = 0; n < items.size(); ++n) {
    ThreadBuf* b = items[n].b;
    const OpRec& r = b->ops[items[n].idx % b->ops.size()];
    PyObject* site = PyTuple_New(2 * r.nframes);
    for (uint32_t j = 0; j < r.nframes; ++j) {
      const FrameRec& f = b->frames[(r.frame_begin + j) % b->frames.size()];
      PyObject* code = f.code ? reinterpret_cast<PyObject*>(f.code) : Py_None;  // None: a script frame
      Py_INCREF(code);
      PyTuple_SET_ITEM(site, 2 * j, code);
      PyTuple_SET_ITEM(site, 2 * j + 1, PyLong_FromLong(f.lasti));
    }
    PyObject* accs = PyTuple_New(r.nacc);
    PyObject* outs = PyTuple_New(r.nout);
    for (uint32_t j = 0; j < r.nacc + r.nout; ++j) {
      AccRec& a = b->accs[(r.acc_begin + j) % b->accs.size()];
      PyObject* t = access_tuple(a);
      if (j < r.nacc)
        PyTuple_SET_ITEM(accs, j, t);
      else
        PyTuple_SET_ITEM(outs, j - r.nacc, t);
    }
    PyObject* param = Py_None;
    Py_INCREF(Py_None);
    if (r.param) {
      auto wt = c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim_copy(r.param);
      if (auto st = wt.lock()) {
        Py_DECREF(Py_None);
        param = THPVariable_Wrap(at::Tensor(std::move(st)));
      }
    }
    PyList_SET_ITEM(out, n,
                    Py_BuildValue("(KLLiNNNNN)", (unsigned long long)r.seq, (long long)b->key, (long long)r.plan->id,
                                  (int)r.backward, site, accs, outs, param, draw_tuple(r)));
  }
  // Release the consumed records' references and hand their space back to the producers.
  for (size_t k = 0; k < bufs.size(); ++k) {
    ThreadBuf* b = bufs[k];
    uint64_t t = b->op_tail.load(std::memory_order_relaxed);
    if (heads[k] == t) continue;
    uint64_t acc_end = 0, frame_end = 0;
    for (uint64_t i = t; i < heads[k]; ++i) {
      OpRec& r = b->ops[i % b->ops.size()];
      for (uint32_t j = 0; j < r.nacc + r.nout; ++j) release_acc(b->accs[(r.acc_begin + j) % b->accs.size()]);
      if (r.param) c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(r.param);
      r.param = nullptr;
      release_generator(r);
      acc_end = r.acc_begin + r.nacc + r.nout;
      frame_end = r.frame_begin + r.nframes;
    }
    b->acc_tail.store(acc_end, std::memory_order_release);
    b->frame_tail.store(frame_end, std::memory_order_release);
    b->op_tail.store(heads[k], std::memory_order_release);
  }
  // Buffers of threads that ended and were drained empty are freed.
  {
    std::lock_guard<std::mutex> g(g_mu);
    for (auto it = g_bufs.begin(); it != g_bufs.end();) {
      ThreadBuf* b = *it;
      if (b->exited && b->op_head.load() == b->op_tail.load()) {
        it = g_bufs.erase(it);
        delete b;
      } else {
        ++it;
      }
    }
  }
  return out;
}

// discard(): drop every published record without building Python objects (benchmarks measure
// the recording alone with it).
PyObject* py_discard(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> dg(g_drain_mu);
  std::vector<ThreadBuf*> bufs;
  {
    std::lock_guard<std::mutex> g(g_mu);
    bufs = g_bufs;
  }
  for (ThreadBuf* b : bufs) {
    const uint64_t h = b->op_head.load(std::memory_order_acquire);
    uint64_t t = b->op_tail.load(std::memory_order_relaxed);
    if (h == t) continue;
    uint64_t acc_end = 0, frame_end = 0;
    for (; t < h; ++t) {
      OpRec& r = b->ops[t % b->ops.size()];
      for (uint32_t j = 0; j < r.nacc + r.nout; ++j) release_acc(b->accs[(r.acc_begin + j) % b->accs.size()]);
      if (r.param) c10::weak_intrusive_ptr<c10::TensorImpl>::reclaim(r.param);
      r.param = nullptr;
      release_generator(r);
      acc_end = r.acc_begin + r.nacc + r.nout;
      frame_end = r.frame_begin + r.nframes;
    }
    b->acc_tail.store(acc_end, std::memory_order_release);
    b->frame_tail.store(frame_end, std::memory_order_release);
    b->op_tail.store(h, std::memory_order_release);
  }
  Py_RETURN_NONE;
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

// Waits (without the GIL) until a buffer is half full or ``timeout`` seconds passed.
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
    {"pause", py_pause, METH_NOARGS, "pause(): stop recording (the observer stays registered, disabled)"},
    {"drain", (PyCFunction)(void (*)(void))py_drain, METH_FASTCALL, "drain([limit_seq]) -> records, sorted"},
    {"script_frame", py_script_frame, METH_O, "script_frame(id) -> (file, line, function)"},
    {"discard", py_discard, METH_NOARGS, "discard(): drop every published record"},
    {"plan", py_plan, METH_O, "plan(id) -> (name, metadata_only, fresh_input)"},
    {"wait", py_wait, METH_O, "wait(timeout) -> whether a producer asked for a drain"},
    {"wake", py_wake, METH_NOARGS, "wake(): end a wait()"},
    {"stats", py_stats, METH_NOARGS, "stats() -> (lost records, cut stacks, native threads)"},
    {"thread_key", py_thread_key, METH_NOARGS, "thread_key() -> the calling thread's key in records"},
    {"suspend", py_suspend, METH_NOARGS, "suspend(): record none of the calling thread's ops until resume()"},
    {"resume", py_resume, METH_NOARGS, "resume(): undo one suspend() of the calling thread"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, "raceguard_native_recorder", nullptr, -1, g_methods};

}  // namespace

PyMODINIT_FUNC PyInit__raceguard_recorder() { return PyModule_Create(&g_module); }
