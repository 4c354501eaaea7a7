/*
 * qcowkit_sparse: lseek(2) with SEEK_DATA / SEEK_HOLE for Node, which has no lseek.
 *
 *   seek(fd, offset, whence) -> number
 *     whence is SEEK_DATA or SEEK_HOLE (exported constants below).
 *     Returns the resulting offset, or -1 when lseek fails with ENXIO
 *     (SEEK_DATA: no data at or after offset; SEEK_HOLE: offset at or past EOF).
 *     Any other failure throws an Error whose `code` is the errno name (EINVAL, ESPIPE, ...).
 *   SEEK_DATA, SEEK_HOLE: the platform's values; both absent (and no `seek`) where the
 *     platform has no such whence values, so JS can tell "unsupported" from "broken".
 *
 * Note: lseek moves the descriptor's file position. qcowkit does only positional I/O
 * (pread/pwrite), so that is harmless there.
 *
 *   fallocate(fd, mode, offset, length) -> Promise<void>   (Linux only)
 *     mode 0: allocate the range (preallocation=falloc, like QEMU's file driver);
 *     mode 1: punch a hole, keeping the size (zero writes that may unmap, discard).
 *     Runs on the libuv thread pool. Rejects with an Error whose `code` is the errno name.
 *
 *   zeroRuns(bytes: Uint8Array, out: Uint32Array) -> number   (every platform)
 *     The buffer's 512-byte sectors (the last one may be shorter) as alternating run lengths, in
 *     sectors: data, zero, data, ... (the first may be 0). Returns how many were stored in `out`,
 *     which must hold at least sectors + 1. A data sector usually shows itself in its first
 *     bytes, so this costs little more than a pass over the zero sectors (convert's zero
 *     detection, qemu-img's rules applied on these runs in JavaScript).
 *
 *   readScan(fd, bytes: Uint8Array, offset, runs: Uint32Array) -> Promise<number>
 *     pread(2) of all of `bytes` at `offset` (to end of file; the rest of `bytes` is zeroed), then
 *     zeroRuns of it into `runs` from index 1, with their count in runs[0] (room: sectors + 2),
 *     on the libuv thread pool: the scan runs where the data was just copied, off the main
 *     thread. Resolves with the bytes read; rejects with an Error whose `code` is the errno name.
 */
#include <node_api.h>
#include <errno.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <stdlib.h>
#ifndef _WIN32
#include <fcntl.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <linux/falloc.h>
#endif

#define CHECK(call)                                                    \
  do {                                                                 \
    if ((call) != napi_ok) {                                           \
      napi_throw_error(env, NULL, "qcowkit_sparse: " #call " failed"); \
      return NULL;                                                     \
    }                                                                  \
  } while (0)

static int sector_is_zero(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    if (w) return 0;
  }
  for (; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

/* The runs of `len` bytes (see zeroRuns) into `out`; returns how many. */
static size_t count_runs(const uint8_t *p, size_t len, uint32_t *out) {
  size_t sectors = (len + 511) / 512, count = 0;
  int zero = 0; /* kind of the current run; the first run is data (maybe empty) */
  uint32_t run = 0;
  for (size_t s = 0; s < sectors; s++) {
    size_t start = s * 512;
    size_t n = len - start < 512 ? len - start : 512;
    int z = sector_is_zero(p + start, n);
    if (z != zero) {
      out[count++] = run;
      run = 0;
      zero = z;
    }
    run++;
  }
  out[count++] = run;
  return count;
}

/* A Uint8Array and a Uint32Array argument; false (with a JS exception) if not. */
static bool bytes_and_runs(napi_env env, napi_value a, napi_value b, uint8_t **data, size_t *len, uint32_t **out, size_t *outLen) {
  napi_typedarray_type t1, t2;
  size_t off;
  napi_value ab;
  bool is1 = false, is2 = false;
  napi_is_typedarray(env, a, &is1);
  napi_is_typedarray(env, b, &is2);
  if (!is1 || !is2 || napi_get_typedarray_info(env, a, &t1, len, (void **)data, &ab, &off) != napi_ok ||
      napi_get_typedarray_info(env, b, &t2, outLen, (void **)out, &ab, &off) != napi_ok ||
      t1 != napi_uint8_array || t2 != napi_uint32_array) {
    napi_throw_type_error(env, NULL, "a Uint8Array and a Uint32Array expected");
    return false;
  }
  return true;
}

static napi_value zero_runs(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 2) {
    napi_throw_type_error(env, NULL, "zeroRuns(bytes, out): two arguments expected");
    return NULL;
  }
  uint8_t *data;
  uint32_t *out;
  size_t len, outLen;
  if (!bytes_and_runs(env, argv[0], argv[1], &data, &len, &out, &outLen)) return NULL;
  if (outLen < (len + 511) / 512 + 1) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "zeroRuns: out must hold sectors + 1 entries");
    return NULL;
  }
  napi_value result;
  napi_create_uint32(env, (uint32_t)count_runs(data, len, out), &result);
  return result;
}

#if defined(SEEK_DATA) && defined(SEEK_HOLE) && !defined(_WIN32)

static const char *errno_code(int e) {
  switch (e) {
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case ENXIO: return "ENXIO";
    case EOVERFLOW: return "EOVERFLOW";
    case ESPIPE: return "ESPIPE";
    case EIO: return "EIO";
#ifdef ENOTSUP
    case ENOTSUP: return "ENOTSUP";
#endif
#if defined(EOPNOTSUPP) && (!defined(ENOTSUP) || EOPNOTSUPP != ENOTSUP)
    case EOPNOTSUPP: return "EOPNOTSUPP";
#endif
#ifdef ENOSYS
    case ENOSYS: return "ENOSYS";
#endif
    default: return "EUNKNOWN";
  }
}

static napi_value seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 3) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, whence) takes 3 arguments");
    return NULL;
  }
  int32_t fd, whence;
  int64_t offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &whence) != napi_ok) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, whence): numbers expected");
    return NULL;
  }
  if (fd < 0 || offset < 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "seek: fd and offset must be >= 0");
    return NULL;
  }
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "seek: whence must be SEEK_DATA or SEEK_HOLE");
    return NULL;
  }
  if ((int64_t)(off_t)offset != offset) {
    napi_throw_range_error(env, "EOVERFLOW", "seek: offset does not fit in off_t");
    return NULL;
  }

  off_t r = lseek(fd, (off_t)offset, whence);
  napi_value result;
  if (r < 0) {
    int e = errno;
    if (e == ENXIO) {
      CHECK(napi_create_int64(env, -1, &result));
      return result;
    }
    char msg[160];
    snprintf(msg, sizeof msg, "lseek(%d, %lld, %s): %s", (int)fd, (long long)offset,
             whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE", strerror(e));
    napi_throw_error(env, errno_code(e), msg);
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)r, &result));
  return result;
}

/* Reject `deferred` with an Error: `message`, and `code` the name of errno `e`. */
static void reject_errno(napi_env env, napi_deferred deferred, const char *message, int e) {
  napi_value m, c, v;
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &m);
  napi_create_string_utf8(env, errno_code(e), NAPI_AUTO_LENGTH, &c);
  napi_create_error(env, c, m, &v);
  napi_reject_deferred(env, deferred, v);
}

/* A promise for `data`'s job, queued on the thread pool as `name`; false if any step failed. */
static bool queue_job(napi_env env, const char *name, napi_async_execute_callback execute,
                      napi_async_complete_callback complete, void *data, napi_async_work *work,
                      napi_deferred *deferred, napi_value *promise) {
  napi_value resource_name;
  return napi_create_promise(env, deferred, promise) == napi_ok &&
         napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name) == napi_ok &&
         napi_create_async_work(env, NULL, resource_name, execute, complete, data, work) == napi_ok &&
         napi_queue_async_work(env, *work) == napi_ok;
}

#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE) && defined(FALLOC_FL_KEEP_SIZE)
#define HAVE_FALLOCATE 1

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd, mode, err;
  int64_t offset, length;
} falloc_job;

static void falloc_execute(napi_env env, void *data) {
  (void)env;
  falloc_job *j = data;
  int flags = j->mode == 1 ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : 0;
  int r;
  do {
    r = fallocate(j->fd, flags, (off_t)j->offset, (off_t)j->length);
  } while (r < 0 && errno == EINTR);
  j->err = r < 0 ? errno : 0;
}

static void falloc_complete(napi_env env, napi_status status, void *data) {
  falloc_job *j = data;
  napi_value v;
  if (status == napi_ok && j->err == 0) {
    napi_get_undefined(env, &v);
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    int e = status == napi_ok ? j->err : EIO;
    char msg[160];
    snprintf(msg, sizeof msg, "fallocate(%s): %s", j->mode == 1 ? "punch hole" : "allocate", strerror(e));
    reject_errno(env, j->deferred, msg, e);
  }
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd, mode;
  int64_t offset, length;
  if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &mode) != napi_ok ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "fallocate(fd, mode, offset, length): numbers expected");
    return NULL;
  }
  if (fd < 0 || offset < 0 || length <= 0 || (mode != 0 && mode != 1)) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "fallocate: bad fd, mode or range");
    return NULL;
  }
  falloc_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "fallocate: out of memory");
    return NULL;
  }
  j->fd = fd;
  j->mode = mode;
  j->offset = offset;
  j->length = length;
  napi_value promise;
  if (!queue_job(env, "qcowkit_fallocate", falloc_execute, falloc_complete, j, &j->work, &j->deferred, &promise)) {
    free(j);
    napi_throw_error(env, NULL, "fallocate: could not queue the request");
    return NULL;
  }
  return promise;
}
#endif

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref bytes_ref, runs_ref;
  int fd, err;
  int64_t offset;
  uint8_t *data;
  size_t len, got;
  uint32_t *runs;
} read_scan_job;

static void read_scan_execute(napi_env env, void *arg) {
  (void)env;
  read_scan_job *j = arg;
  while (j->got < j->len) {
    ssize_t n = pread(j->fd, j->data + j->got, j->len - j->got, (off_t)(j->offset + (int64_t)j->got));
    if (n < 0) {
      if (errno == EINTR) continue;
      j->err = errno;
      return;
    }
    if (n == 0) break;
    j->got += (size_t)n;
  }
  memset(j->data + j->got, 0, j->len - j->got);
  j->runs[0] = (uint32_t)count_runs(j->data, j->len, j->runs + 1);
}

static void read_scan_complete(napi_env env, napi_status status, void *arg) {
  read_scan_job *j = arg;
  if (status == napi_ok && j->err == 0) {
    napi_value v;
    napi_create_double(env, (double)j->got, &v);
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    int e = status == napi_ok ? j->err : EIO;
    reject_errno(env, j->deferred, strerror(e), e);
  }
  napi_delete_reference(env, j->bytes_ref);
  napi_delete_reference(env, j->runs_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value read_scan(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  int64_t offset;
  uint8_t *data;
  uint32_t *runs;
  size_t len, runsLen;
  if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) {
    napi_throw_type_error(env, NULL, "readScan(fd, bytes, offset, runs): bad arguments");
    return NULL;
  }
  if (!bytes_and_runs(env, argv[1], argv[3], &data, &len, &runs, &runsLen)) return NULL;
  if (runsLen < (len + 511) / 512 + 2) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "readScan: runs must hold sectors + 2 entries");
    return NULL;
  }
  read_scan_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "readScan: out of memory");
    return NULL;
  }
  j->fd = fd;
  j->offset = offset;
  j->data = data;
  j->len = len;
  j->runs = runs;
  napi_value promise;
  /* both arrays are held until the work completes */
  if (napi_create_reference(env, argv[1], 1, &j->bytes_ref) != napi_ok) goto fail;
  if (napi_create_reference(env, argv[3], 1, &j->runs_ref) != napi_ok) goto fail_bytes;
  if (!queue_job(env, "qcowkit_read_scan", read_scan_execute, read_scan_complete, j, &j->work, &j->deferred, &promise))
    goto fail_runs;
  return promise;
fail_runs:
  napi_delete_reference(env, j->runs_ref);
fail_bytes:
  napi_delete_reference(env, j->bytes_ref);
fail:
  free(j);
  napi_throw_error(env, NULL, "readScan: could not queue the request");
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn, v;
  CHECK(napi_create_function(env, "readScan", NAPI_AUTO_LENGTH, read_scan, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "readScan", fn));
  CHECK(napi_create_function(env, "zeroRuns", NAPI_AUTO_LENGTH, zero_runs, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "zeroRuns", fn));
  CHECK(napi_create_function(env, "seek", NAPI_AUTO_LENGTH, seek, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "seek", fn));
  CHECK(napi_create_int32(env, SEEK_DATA, &v));
  CHECK(napi_set_named_property(env, exports, "SEEK_DATA", v));
  CHECK(napi_create_int32(env, SEEK_HOLE, &v));
  CHECK(napi_set_named_property(env, exports, "SEEK_HOLE", v));
#ifdef HAVE_FALLOCATE
  CHECK(napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, do_fallocate, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "fallocate", fn));
#endif
  return exports;
}

#else /* no SEEK_DATA/SEEK_HOLE on this platform: export nothing */

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  CHECK(napi_create_function(env, "zeroRuns", NAPI_AUTO_LENGTH, zero_runs, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "zeroRuns", fn));
  return exports;
}

#endif

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
