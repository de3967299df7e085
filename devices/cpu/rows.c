/* kvfuse.devices.cpu._rows: whole pages between host pools in one pass (copy_pages).
 *
 *   copy_rows(dst, dst_ids, src, src_ids, lo, hi, row_bytes, threads=1)
 *
 * sets row dst_ids[i] of dst to row src_ids[i] of src, for lo <= i < hi. Every argument is
 * an integer: the address of a contiguous host buffer or of an int64 id array, which the
 * caller (moves.py) has range-checked. The GIL is released for the whole call.
 *
 *   copy_spans(pairs, npairs, spans, count, threads=1) -> int
 *
 * copies ``count`` byte spans, spans[i] = (pair, dst offset, src offset, length), between
 * the buffers of pairs[pair] = (dst address, dst bytes, src address, src bytes) (both
 * int64 arrays), split by bytes over the team: chunks' K and V from host copies into a
 * pool's pages, one span per layer and run of consecutive pages (the store's host ->
 * pool writes, every chunk of a step in one call; a partly filled last page is copied up
 * to its last token, no further). Every span is checked to lie inside its pair's buffers
 * before any byte moves: returns -1, or the index of the first span that does not (and
 * then copies nothing).
 *
 *   use_openmp(path) -> bool
 *
 * takes the OpenMP runtime already loaded from ``path`` (torch's: dlopen with
 * RTLD_NOLOAD, never a second copy), after which copy_rows with threads > 1 splits the
 * rows over that runtime's team (GOMP_parallel), torch's own intra-op threads. Python
 * threads would not do: after each parallel torch op its OpenMP workers spin for a
 * while, holding the cores a thread of ours needs (measured, 2 cores: two Python threads
 * copied at 22 GB/s after a torch op, 38-39 GB/s after none; the team, whatever ran
 * before).
 *
 * Why not torch: an indexed-to-indexed copy has no torch op, so copy_pages took a gather
 * into a stage and a scatter out of it, two passes over the bytes. Here each page is read
 * once and written once:
 *   - with non-temporal stores where rows are whole cache lines (a page written into a
 *     pool is not read again before it has left the cache, and streaming skips reading
 *     the destination lines first);
 *   - with the next page's lines prefetched while this one is copied, so more than one
 *     page is in flight per core (the hardware prefetcher stops at every 4 KiB page).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Without a next row to fetch (a span), the lines AHEAD bytes on: the next 4 KiB page,
 * where the hardware prefetcher stops. 90 chunks' spans of 35 KB into a pool: 111-116 %
 * of memcpy with it, 96-103 % without (same run, slow-memory regime). */
#define AHEAD 4096

static void copy_row(char *dst, const char *src, size_t n, const char *next) {
#if defined(__SSE2__)
  if ((uintptr_t)dst % 16 == 0 && n % 64 == 0) {
    for (size_t o = 0; o < n; o += 64) {
      __builtin_prefetch(next ? next + o : src + o + AHEAD, 0, 0);
      __m128i a = _mm_loadu_si128((const __m128i *)(src + o));
      __m128i b = _mm_loadu_si128((const __m128i *)(src + o + 16));
      __m128i c = _mm_loadu_si128((const __m128i *)(src + o + 32));
      __m128i d = _mm_loadu_si128((const __m128i *)(src + o + 48));
      _mm_stream_si128((__m128i *)(dst + o), a);
      _mm_stream_si128((__m128i *)(dst + o + 16), b);
      _mm_stream_si128((__m128i *)(dst + o + 32), c);
      _mm_stream_si128((__m128i *)(dst + o + 48), d);
    }
    return;
  }
#endif
  (void)next;
  memcpy(dst, src, n);
}

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel; /* the loaded runtime's, once use_openmp found it */
static omp_int_fn omp_thread_num, omp_num_threads;

struct rows {
  char *d;
  const char *s;
  const int64_t *di, *si;
  long long lo, hi, row;
};

static void copy_part(const struct rows *r, long long lo, long long hi) {
  for (long long i = lo; i < hi; i++) {
    const char *next = i + 1 < hi ? r->s + r->si[i + 1] * r->row : NULL;
    copy_row(r->d + r->di[i] * r->row, r->s + r->si[i] * r->row, (size_t)r->row, next);
  }
#if defined(__SSE2__)
  _mm_sfence(); /* the streamed stores are visible before the part ends */
#endif
}

static void team_part(void *arg) { /* run by each thread of the OpenMP team: its share */
  const struct rows *r = (const struct rows *)arg;
  long long n = r->hi - r->lo, t = omp_thread_num(), of = omp_num_threads();
  copy_part(r, r->lo + n * t / of, r->lo + n * (t + 1) / of);
}

static PyObject *copy_rows(PyObject *self, PyObject *args) {
  unsigned long long dst, dst_ids, src, src_ids;
  long long lo, hi, row;
  int threads = 1;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKKLLL|i", &dst, &dst_ids, &src, &src_ids, &lo, &hi, &row, &threads)) return NULL;
  if (lo < 0 || hi < lo || row <= 0 || !dst || !src || !dst_ids || !src_ids || threads < 1) {
    PyErr_SetString(PyExc_ValueError, "copy_rows: need buffers, id arrays, 0 <= lo <= hi, row_bytes > 0, threads >= 1");
    return NULL;
  }
  struct rows r = {(char *)(uintptr_t)dst, (const char *)(uintptr_t)src, (const int64_t *)(uintptr_t)dst_ids,
                   (const int64_t *)(uintptr_t)src_ids, lo, hi, row};
  Py_BEGIN_ALLOW_THREADS
  if (threads > 1 && gomp_parallel && hi - lo > 1)
    gomp_parallel(team_part, &r, (unsigned)threads, 0);
  else
    copy_part(&r, lo, hi);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static void copy_bytes(char *dst, const char *src, size_t n) {
#if defined(__SSE2__)
  if (n >= 4096) { /* streamed from the first 64-byte boundary of dst; the edges by memcpy */
    size_t head = (64 - (uintptr_t)dst % 64) % 64, body = (n - head) / 64 * 64;
    memcpy(dst, src, head);
    copy_row(dst + head, src + head, body, NULL);
    memcpy(dst + head + body, src + head + body, n - head - body);
    return;
  }
#endif
  memcpy(dst, src, n);
}

struct spans {
  const int64_t *pairs; /* npairs x (dst address, dst bytes, src address, src bytes) */
  const int64_t *sp;    /* count x (pair, dst offset, src offset, length) */
  long long count, total;
};

static void spans_part(const struct spans *r, long long lo, long long hi) { /* bytes [lo, hi) of the spans */
  long long at = 0;
  for (long long i = 0; i < r->count && at < hi; i++) {
    const int64_t *x = r->sp + 4 * i, *p = r->pairs + 4 * x[0];
    long long a = lo > at ? lo - at : 0, b = hi - at < x[3] ? hi - at : x[3];
    if (a < b) copy_bytes((char *)(uintptr_t)p[0] + x[1] + a, (const char *)(uintptr_t)p[2] + x[2] + a, (size_t)(b - a));
    at += x[3];
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

static void team_spans(void *arg) {
  const struct spans *r = (const struct spans *)arg;
  long long t = omp_thread_num(), of = omp_num_threads();
  spans_part(r, r->total * t / of / 64 * 64, t + 1 == of ? r->total : r->total * (t + 1) / of / 64 * 64);
}

static PyObject *copy_spans(PyObject *self, PyObject *args) {
  unsigned long long pairs, sp;
  long long npairs, count;
  int threads = 1;
  (void)self;
  if (!PyArg_ParseTuple(args, "KLKL|i", &pairs, &npairs, &sp, &count, &threads)) return NULL;
  if (npairs < 0 || count < 0 || (npairs && !pairs) || (count && !sp) || threads < 1) {
    PyErr_SetString(PyExc_ValueError, "copy_spans: need pair and span arrays, counts >= 0, threads >= 1");
    return NULL;
  }
  struct spans r = {(const int64_t *)(uintptr_t)pairs, (const int64_t *)(uintptr_t)sp, count, 0};
  for (long long i = 0; i < count; i++) { /* every span inside its pair's buffers, before a byte moves */
    const int64_t *x = r.sp + 4 * i;
    if (x[0] < 0 || x[0] >= npairs || x[1] < 0 || x[2] < 0 || x[3] < 0) return PyLong_FromLongLong(i);
    const int64_t *p = r.pairs + 4 * x[0];
    if (x[1] > p[1] || x[3] > p[1] - x[1] || x[2] > p[3] || x[3] > p[3] - x[2]) return PyLong_FromLongLong(i);
    r.total += x[3];
  }
  Py_BEGIN_ALLOW_THREADS
  if (threads > 1 && gomp_parallel && r.total >= 2 * 4096)
    gomp_parallel(team_spans, &r, (unsigned)threads, 0);
  else
    spans_part(&r, 0, r.total);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(-1);
}

static PyObject *use_openmp(PyObject *self, PyObject *args) {
  const char *path;
  (void)self;
  if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
  void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD); /* only a runtime that is loaded already */
  if (!lib) Py_RETURN_FALSE;
  gomp_parallel_fn p = (gomp_parallel_fn)dlsym(lib, "GOMP_parallel");
  omp_int_fn t = (omp_int_fn)dlsym(lib, "omp_get_thread_num"), n = (omp_int_fn)dlsym(lib, "omp_get_num_threads");
  if (!p || !t || !n) {
    dlclose(lib);
    Py_RETURN_FALSE;
  }
  omp_thread_num = t, omp_num_threads = n, gomp_parallel = p; /* the handle stays open */
  Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(dst, dst_ids, src, src_ids, lo, hi, row_bytes, threads=1): row dst_ids[i] of dst = row src_ids[i] of src"},
    {"copy_spans", copy_spans, METH_VARARGS,
     "copy_spans(pairs, npairs, spans, count, threads=1) -> -1, or the first span outside its pair's buffers "
     "(nothing copied); pairs[p] = (dst address, dst bytes, src address, src bytes), "
     "spans[i] = (pair, dst offset, src offset, length): int64 arrays"},
    {"use_openmp", use_openmp, METH_VARARGS,
     "use_openmp(path) -> bool: split copy_rows over the OpenMP runtime loaded from path"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
