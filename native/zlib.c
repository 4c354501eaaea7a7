/*
 * qcowkit_zlib: raw-deflate decompression of compressed clusters on libuv's thread pool, as QEMU
 * decompresses qcow2 clusters on its thread pool, so reading a compressed image uses every core.
 *
 *   inflateRaw(input, output) -> Promise<number>
 *     Decompresses the raw deflate data at the start of `input` (a Uint8Array; bytes after the
 *     end of the deflate stream are ignored, like the padding after a qcow2 compressed cluster)
 *     into `output` (a Uint8Array) and resolves with the bytes written, or -1 when the data is
 *     not valid deflate. As in QEMU a cluster is good only when it fills `output`: the caller
 *     compares the result with output.length. Both arrays must stay untouched until it settles.
 *
 * Why not node:zlib: its one-shot async API builds a stream object per call, which costs the
 * main thread as much as inflating a 64 KiB cluster does; its sync API runs on the main thread.
 * Each pool thread keeps one z_stream (inflateReset between clusters). zlib is the copy Node is
 * built with: its headers ship with Node's, its symbols are the node binary's.
 */
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define CHECK(call)                                                  \
  do {                                                               \
    if ((call) != napi_ok) {                                         \
      napi_throw_error(env, NULL, "qcowkit_zlib: " #call " failed"); \
      return NULL;                                                   \
    }                                                                \
  } while (0)

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref in_ref, out_ref;
  uint8_t *in, *out;
  size_t in_len, out_len;
  double produced;
} inflate_job;

/* One stream per pool thread, made on first use (-15: raw deflate, any window up to 32 KiB). */
static __thread z_stream *thread_strm;

static void inflate_execute(napi_env env, void *data) {
  (void)env;
  inflate_job *j = data;
  j->produced = -1;
  if (!thread_strm) {
    z_stream *s = calloc(1, sizeof *s);
    if (!s) return;
    if (inflateInit2(s, -15) != Z_OK) {
      free(s);
      return;
    }
    thread_strm = s;
  } else if (inflateReset(thread_strm) != Z_OK) {
    return;
  }
  z_stream *s = thread_strm;
  s->next_in = j->in;
  s->avail_in = (uInt)j->in_len;
  s->next_out = j->out;
  s->avail_out = (uInt)j->out_len;
  int ret = inflate(s, Z_FINISH);
  /* Z_BUF_ERROR / Z_OK with a full output: the cluster ends before the stream does (QEMU takes it). */
  if (ret == Z_STREAM_END || ret == Z_OK || ret == Z_BUF_ERROR) j->produced = (double)(j->out_len - s->avail_out);
}

static void inflate_complete(napi_env env, napi_status status, void *data) {
  inflate_job *j = data;
  napi_value v;
  if (status == napi_ok && napi_create_double(env, j->produced, &v) == napi_ok) {
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    napi_value msg;
    napi_create_string_utf8(env, "inflateRaw: the request was cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &v);
    napi_reject_deferred(env, j->deferred, v);
  }
  napi_delete_reference(env, j->in_ref);
  napi_delete_reference(env, j->out_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

static int typed_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  napi_typedarray_type type;
  size_t length, offset;
  void *base;
  napi_value ab;
  if (napi_get_typedarray_info(env, v, &type, &length, &base, &ab, &offset) != napi_ok) return 0;
  if (type != napi_uint8_array) return 0;
  *data = base;
  *len = length;
  return 1;
}

static napi_value inflate_raw(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], promise, name;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  inflate_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "inflateRaw: out of memory");
    return NULL;
  }
  if (argc != 2 || !typed_bytes(env, argv[0], &j->in, &j->in_len) || !typed_bytes(env, argv[1], &j->out, &j->out_len)) {
    free(j);
    napi_throw_type_error(env, NULL, "inflateRaw(input, output): two Uint8Arrays expected");
    return NULL;
  }
  if (j->in_len > UINT32_MAX || j->out_len > UINT32_MAX) {
    free(j);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "inflateRaw: buffer too large");
    return NULL;
  }
  /* keep both arrays alive while a pool thread uses their memory */
  if (napi_create_reference(env, argv[0], 1, &j->in_ref) != napi_ok) {
    free(j);
    napi_throw_error(env, NULL, "inflateRaw: could not queue the request");
    return NULL;
  }
  if (napi_create_reference(env, argv[1], 1, &j->out_ref) != napi_ok) {
    napi_delete_reference(env, j->in_ref);
    free(j);
    napi_throw_error(env, NULL, "inflateRaw: could not queue the request");
    return NULL;
  }
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "qcowkit_inflate", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, inflate_execute, inflate_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    napi_delete_reference(env, j->in_ref);
    napi_delete_reference(env, j->out_ref);
    free(j);
    napi_throw_error(env, NULL, "inflateRaw: could not queue the request");
    return NULL;
  }
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  CHECK(napi_create_function(env, "inflateRaw", NAPI_AUTO_LENGTH, inflate_raw, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "inflateRaw", fn));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
