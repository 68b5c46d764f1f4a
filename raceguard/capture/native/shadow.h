// Native shadow memory: the happens-before state of the storages whose accesses the drain can
// decide without Python, with exactly the FastTrack transitions of engine/hb.py.
//
// Why a cache in front of the Python engine rather than a second engine: a storage stays here
// while every access to it is race-free and covers the one byte interval it has (whole-tensor
// accesses, by far the most common); the first access that could race, or that needs interval
// splitting or anything else only Python does (naming, hazards, shared memory, gradients), hands
// the storage to the Python engine for good (materialize), which then makes that very access.
// So every finding is made, named and reported by the same Python code as before, from the same
// state, and the Python engine stays the oracle (tests/test_native_shadow.py drives both).
//
// Not thread-safe: used only by the drain, which holds the GIL. Owned Python references are
// released with the GIL held; the table itself is never destroyed (it outlives the interpreter's
// teardown, where the GIL may be gone).
#pragma once

#include <Python.h>

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace shadow {

// A timeline's vector clock as the Python engine holds it (missing entries are 0).
struct Clock {
  const int64_t* v = nullptr;
  size_t n = 0;
  int64_t at(int64_t i) const { return i >= 0 && static_cast<size_t>(i) < n ? v[i] : 0; }
};

// One remembered access: engine/hb.py's AccessRecord (or CreationRecord), its report payload
// kept as references to the op's site tuple and the thread's (locks, origin) context.
struct Access {
  int64_t timeline = -1;  // -1: no access
  int64_t epoch = 0;
  int64_t plan = 0;
  bool write = false;
  bool creates = false;
  PyObject* site = nullptr;  // owned
  PyObject* ctx = nullptr;   // owned

  Access() = default;
  // Takes new references to ``site_`` and ``ctx_``.
  Access(int64_t timeline_, int64_t epoch_, int64_t plan_, bool write_, bool creates_, PyObject* site_,
         PyObject* ctx_)
      : timeline(timeline_), epoch(epoch_), plan(plan_), write(write_), creates(creates_), site(site_), ctx(ctx_) {
    Py_XINCREF(site);
    Py_XINCREF(ctx);
  }
  Access(const Access& o) { *this = o; }
  Access& operator=(const Access& o) {
    if (this == &o) return *this;
    Py_XINCREF(o.site);
    Py_XINCREF(o.ctx);
    Py_XDECREF(site);
    Py_XDECREF(ctx);
    timeline = o.timeline;
    epoch = o.epoch;
    plan = o.plan;
    write = o.write;
    creates = o.creates;
    site = o.site;
    ctx = o.ctx;
    return *this;
  }
  ~Access() {
    Py_XDECREF(site);
    Py_XDECREF(ctx);
  }
  bool valid() const { return timeline >= 0; }

  // (timeline, epoch, is_write, creates, site, plan, ctx)
  PyObject* to_python() const {
    return Py_BuildValue("(LLOOOLO)", (long long)timeline, (long long)epoch, write ? Py_True : Py_False,
                         creates ? Py_True : Py_False, site ? site : Py_None, (long long)plan, ctx ? ctx : Py_None);
  }
};

// The storage's one interval [lo, hi): its last write and the reads since, as hb.py's _Cell.
// reads: none, one access (totally ordered reads), or per timeline in first-read order (hb.py's
// dict, once two reads were concurrent).
struct Entry {
  void* weak = nullptr;  // the recorder's weak reference to the StorageImpl (null in tests)
  bool has_interval = false;
  int64_t lo = 0, hi = 0;
  Access write;
  std::vector<Access> reads;
  bool reads_per_timeline = false;
  // what naming needs, should the storage be handed to Python
  int8_t dtype = 0;
  bool seen_only = false;
  std::vector<int64_t> shape;
  PyObject* alloc_site = nullptr;  // owned

  Entry() = default;
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  ~Entry() { Py_XDECREF(alloc_site); }

  // What naming needs: the dtype, shape and site of the storage's creation (or first sight).
  void describe(int8_t dtype_, const int64_t* sizes, size_t ndim, PyObject* site, bool seen_only_) {
    dtype = dtype_;
    shape.assign(sizes, sizes + ndim);
    Py_XINCREF(site);
    Py_XSETREF(alloc_site, site);
    seen_only = seen_only_;
  }

  bool only_timeline(int64_t tl) const {
    if (write.valid() && write.timeline != tl) return false;
    if (reads_per_timeline) return false;
    return reads.empty() || reads[0].timeline == tl;
  }

  // Whether an access of timeline ``tl`` (epoch ``e``, clock ``c``) over [lo, hi) can be applied
  // here: the range is the interval (or the first one), and it races with nothing remembered.
  bool fits(int64_t a_lo, int64_t a_hi, int64_t tl, int64_t e, const Clock& c, bool is_write) const {
    if (a_hi <= a_lo) return true;  // hb.py ignores empty ranges
    if (has_interval && (a_lo != lo || a_hi != hi)) return false;
    if (!has_interval || only_timeline(tl)) return true;
    if (!is_write && !reads_per_timeline && reads.size() == 1 && reads[0].timeline == tl && reads[0].epoch == e)
      return true;  // the same epoch's read is already remembered
    if (write.valid() && write.timeline != tl && !write.creates && write.epoch > c.at(write.timeline)) return false;
    if (is_write)
      for (const Access& r : reads)
        if (r.timeline != tl && r.epoch > c.at(r.timeline)) return false;
    return true;
  }

  // Remember an access that fits(): hb.py's access_range without races.
  void apply(int64_t a_lo, int64_t a_hi, const Access& rec, const Clock& c) {
    if (a_hi <= a_lo) return;
    if (!has_interval) {
      has_interval = true;
      lo = a_lo;
      hi = a_hi;
    }
    const int64_t tl = rec.timeline;
    if (rec.write) {
      write = rec;
      reads.clear();
      reads_per_timeline = false;
      return;
    }
    if (reads_per_timeline) {
      for (Access& r : reads)
        if (r.timeline == tl) return void(r = rec);
      reads.push_back(rec);
      return;
    }
    if (reads.empty()) return reads.push_back(rec);
    Access& prev = reads[0];
    if (prev.timeline == tl && prev.epoch == rec.epoch) return;  // nothing new (FastTrack)
    if (prev.timeline == tl || prev.epoch <= c.at(prev.timeline)) {
      prev = rec;  // the earlier read happens before this one: one epoch suffices
    } else {
      reads.push_back(rec);
      reads_per_timeline = true;
    }
  }

  // New memory of ``nbytes`` created by ``rec`` (hb.py's CreationRecord over [0, nbytes)).
  void create(int64_t nbytes, const Access& rec) {
    reads.clear();
    reads_per_timeline = false;
    if (nbytes > 0) {
      has_interval = true;
      lo = 0;
      hi = nbytes;
      write = rec;
    } else {
      has_interval = false;
      write = Access();
    }
  }

  // (lo, hi, write, reads) for the Python engine: lo/hi None without an interval; write None or
  // an access tuple; reads None, one access tuple, or a list of them (per timeline).
  PyObject* state_to_python() const {
    PyObject* w = write.valid() ? write.to_python() : (Py_INCREF(Py_None), Py_None);
    PyObject* r;
    if (reads_per_timeline) {
      r = PyList_New(static_cast<Py_ssize_t>(reads.size()));
      for (size_t i = 0; i < reads.size(); ++i) PyList_SET_ITEM(r, i, reads[i].to_python());
    } else if (reads.empty()) {
      r = (Py_INCREF(Py_None), Py_None);
    } else {
      r = reads[0].to_python();
    }
    if (!has_interval) return Py_BuildValue("(OONN)", Py_None, Py_None, w, r);
    return Py_BuildValue("(LLNN)", (long long)lo, (long long)hi, w, r);
  }
};

// Entries by storage address. The recorder decides liveness and releases the weak references
// (it knows their type); the table only stores them.
class Table {
 public:
  using Map = std::unordered_map<uintptr_t, Entry*>;
  using Release = void (*)(void*);
  using Alive = bool (*)(void*);

  Table(Release release, Alive alive) : release_(release), alive_(alive) {}

  // The live entry for ``key``, or null (a dead one is dropped).
  Entry* find(uintptr_t key) {
    auto it = map_.find(key);
    if (it == map_.end()) return nullptr;
    if (it->second->weak != nullptr && !alive_(it->second->weak)) {
      drop(it);
      return nullptr;
    }
    return it->second;
  }

  // A fresh entry for ``key`` (replacing any), holding ``weak`` (taken over).
  Entry* fresh(uintptr_t key, void* weak) {
    Entry* e = new Entry();
    e->weak = weak;
    return place(key, e);
  }

  // ``e`` (taken over, its weak reference with it) becomes the entry of ``key``, replacing any.
  Entry* place(uintptr_t key, Entry* e) {
    auto it = map_.find(key);
    if (it != map_.end()) drop(it);
    map_.emplace(key, e);
    ++placed_since_sweep_;
    return e;
  }

  // Sweeps once max(32, live entries / 8) entries were placed since the last sweep. Called only
  // where no entry pointer is held: a sweep while a record is applied could free an entry of that
  // record whose storage died meanwhile on the target's thread.
  void maybe_sweep() {
    if (placed_since_sweep_ > next_sweep_) sweep();
  }

  // Hands the entry over: removed from the table, the caller deletes it (and its weak reference).
  Entry* take(uintptr_t key) {
    auto it = map_.find(key);
    if (it == map_.end()) return nullptr;
    Entry* e = it->second;
    map_.erase(it);
    return e;
  }

  void destroy(Entry* e) {
    if (e->weak != nullptr) release_(e->weak);
    delete e;
  }

  bool alive(const Entry* e) const { return e->weak == nullptr || alive_(e->weak); }
  size_t size() const { return map_.size(); }

  // Drops the entries of storages that died (no Python work per free: they are found here).
  void sweep() {
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second->weak != nullptr && !alive_(it->second->weak)) {
        destroy(it->second);
        it = map_.erase(it);
      } else {
        ++it;
      }
    }
    // Dead entries pin their StorageImpl objects (not the data): few, so that the target's heap
    // around them can be reused (a four-thread server's peak RSS: 263 MB sweeping after
    // max(256, live) placements, 253 MB after max(32, live / 8), 242 MB plain); amortised
    // eight liveness checks per entry placed.
    next_sweep_ = std::max<size_t>(32, map_.size() / 8);
    placed_since_sweep_ = 0;
  }

  void clear() {
    for (auto& kv : map_) destroy(kv.second);
    map_.clear();
  }

 private:
  void drop(Map::iterator it) {
    destroy(it->second);
    map_.erase(it);
  }

  Map map_;
  size_t next_sweep_ = 32;
  size_t placed_since_sweep_ = 0;
  Release release_;
  Alive alive_;
};

}  // namespace shadow
