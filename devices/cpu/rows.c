/* kvfuse.devices.cpu._rows: whole pages between host pools in one pass (copy_pages).
 *
 *   copy_rows(dst, dst_ids, src, src_ids, lo, hi, row_bytes)
 *
 * sets row dst_ids[i] of dst to row src_ids[i] of src, for lo <= i < hi. Every argument is
 * an integer: the address of a contiguous host buffer or of an int64 id array, which the
 * caller (moves.py) has range-checked. The GIL is released for the whole call, so a few
 * Python threads copy in parallel, one call each.
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
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void copy_row(char *dst, const char *src, size_t n, const char *next) {
#if defined(__SSE2__)
  if ((uintptr_t)dst % 16 == 0 && n % 64 == 0) {
    for (size_t o = 0; o < n; o += 64) {
      if (next) __builtin_prefetch(next + o, 0, 0);
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

static PyObject *copy_rows(PyObject *self, PyObject *args) {
  unsigned long long dst, dst_ids, src, src_ids;
  long long lo, hi, row;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKKLLL", &dst, &dst_ids, &src, &src_ids, &lo, &hi, &row)) return NULL;
  if (lo < 0 || hi < lo || row <= 0 || !dst || !src || !dst_ids || !src_ids) {
    PyErr_SetString(PyExc_ValueError, "copy_rows: need buffers, id arrays, 0 <= lo <= hi and row_bytes > 0");
    return NULL;
  }
  char *d = (char *)(uintptr_t)dst;
  const char *s = (const char *)(uintptr_t)src;
  const int64_t *di = (const int64_t *)(uintptr_t)dst_ids, *si = (const int64_t *)(uintptr_t)src_ids;
  Py_BEGIN_ALLOW_THREADS
  for (long long i = lo; i < hi; i++) {
    const char *next = i + 1 < hi ? s + si[i + 1] * row : NULL;
    copy_row(d + di[i] * row, s + si[i] * row, (size_t)row, next);
  }
#if defined(__SSE2__)
  _mm_sfence(); /* the streamed stores are visible before the call returns */
#endif
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(dst, dst_ids, src, src_ids, lo, hi, row_bytes): row dst_ids[i] of dst = row src_ids[i] of src"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
