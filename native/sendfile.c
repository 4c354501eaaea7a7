/*
 * qcowkit_sendfile: send a reply header and file bytes to a socket without copying the bytes
 * through user space, for the NBD server's READ replies (Linux: send(2) then sendfile(2) from
 * the page cache to the socket). Bytes past the end of the file are sent as zeros (a file shorter
 * than the image reads as zeros there). `done` counts the bytes already sent (header first), so
 * a send that stopped can be resumed.
 *
 *   trySend(socketFd, header, fileFd, offset, length, done) -> number
 *     Sends on the calling thread until everything is sent or the socket (non-blocking, as libuv
 *     keeps it) is full; returns the new `done`. Throws an Error whose `code` is the errno name.
 *   sendFile(socketFd, header, fileFd, offset, length, done, cancel) -> Promise<number>
 *     The same on libuv's thread pool, waiting in poll(2) while the socket is full, in short
 *     slices, until everything is sent (resolves with the total) or `cancel[0]` (an Int32Array)
 *     is set (rejects with ECANCELED). Rejects with an Error whose `code` is the errno name.
 *   supported: true where sendfile(2) to a socket is available (Linux).
 *
 * After a failure part of a reply may have been sent: the caller must drop the connection.
 */
#include <node_api.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <poll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#define HAVE_SENDFILE 1
#endif

#define CHECK(call)                                                      \
  do {                                                                   \
    if ((call) != napi_ok) {                                             \
      napi_throw_error(env, NULL, "qcowkit_sendfile: " #call " failed"); \
      return NULL;                                                       \
    }                                                                    \
  } while (0)

#ifdef HAVE_SENDFILE

/* One send: `hlen` header bytes, then `length` bytes of the file from `offset`; `done` counts the
 * bytes sent so far (both parts), so a send can be resumed. */
typedef struct {
  int sock, file;
  const uint8_t *header;
  int64_t hlen, offset, length, done;
} send_state;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref header_ref, cancel_ref;
  volatile int32_t *cancel;
  send_state st;
  int err;
} send_job;

static const char *errno_code(int e) {
  switch (e) {
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case ECANCELED: return "ECANCELED";
    case EAGAIN: return "EAGAIN";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case ENOTSOCK: return "ENOTSOCK";
    case ENOMEM: return "ENOMEM";
    case EOVERFLOW: return "EOVERFLOW";
    case ENOTCONN: return "ENOTCONN";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return "EUNKNOWN";
  }
}

static const uint8_t zeros[65536];

/* Send what is left of `s` until done (0), the socket is full (EAGAIN) or an error (errno). */
static int send_some(send_state *s) {
  int64_t total = s->hlen + s->length;
  while (s->done < total) {
    ssize_t n;
    if (s->done < s->hlen) {
      n = send(s->sock, s->header + s->done, (size_t)(s->hlen - s->done), MSG_NOSIGNAL | MSG_MORE);
    } else {
      int64_t at = s->done - s->hlen, left = s->length - at;
      off_t pos = (off_t)(s->offset + at);
      size_t want = left > 0x40000000 ? 0x40000000 : (size_t)left;
      n = sendfile(s->sock, s->file, &pos, want);
      if (n == 0) {
        /* past the end of the file: the rest reads as zeros */
        want = left > (int64_t)sizeof zeros ? sizeof zeros : (size_t)left;
        n = send(s->sock, zeros, want, MSG_NOSIGNAL);
      }
    }
    if (n > 0) {
      s->done += n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return EAGAIN;
    return n < 0 ? errno : EIO;
  }
  return 0;
}

static void send_execute(napi_env env, void *data) {
  (void)env;
  send_job *j = data;
  for (;;) {
    int e = send_some(&j->st);
    if (e != EAGAIN) {
      j->err = e;
      return;
    }
    /* the socket is full: wait for room, in slices, until asked to stop */
    for (;;) {
      if (*j->cancel) {
        j->err = ECANCELED;
        return;
      }
      struct pollfd p = {.fd = j->st.sock, .events = POLLOUT, .revents = 0};
      int r = poll(&p, 1, 100);
      if (r < 0 && errno != EINTR) {
        j->err = errno;
        return;
      }
      if (r > 0) {
        if (p.revents & POLLNVAL) {
          j->err = EBADF;
          return;
        }
        break; /* writable, or an error the next send reports */
      }
    }
  }
}

static napi_value errno_error(napi_env env, int e, const char *what) {
  napi_value v, msg, code;
  char text[160];
  snprintf(text, sizeof text, "%s: %s", what, strerror(e));
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, errno_code(e), NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &v);
  return v;
}

static void send_complete(napi_env env, napi_status status, void *data) {
  send_job *j = data;
  napi_value v;
  if (status == napi_ok && !j->err) {
    napi_create_double(env, (double)j->st.done, &v);
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    napi_reject_deferred(env, j->deferred, errno_error(env, status == napi_ok ? j->err : ECANCELED, "sendfile"));
  }
  napi_delete_reference(env, j->header_ref);
  napi_delete_reference(env, j->cancel_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

/* (socketFd, header, fileFd, offset, length, done) -> state, or NULL with an exception pending */
static int read_args(napi_env env, napi_value *argv, send_state *s) {
  int32_t sock, file;
  napi_typedarray_type type;
  size_t count, byte_offset;
  void *base;
  napi_value ab;
  if (napi_get_value_int32(env, argv[0], &sock) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &count, &base, &ab, &byte_offset) != napi_ok || type != napi_uint8_array ||
      napi_get_value_int32(env, argv[2], &file) != napi_ok || napi_get_value_int64(env, argv[3], &s->offset) != napi_ok ||
      napi_get_value_int64(env, argv[4], &s->length) != napi_ok || napi_get_value_int64(env, argv[5], &s->done) != napi_ok) {
    napi_throw_type_error(env, NULL, "(socketFd, header: Uint8Array, fileFd, offset, length, done) expected");
    return 0;
  }
  s->sock = sock;
  s->file = file;
  s->header = base;
  s->hlen = (int64_t)count;
  if (sock < 0 || file < 0 || s->offset < 0 || s->length < 0 || s->offset > INT64_MAX - s->length || s->done < 0 ||
      s->done > s->hlen + s->length) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "sendfile: bad descriptor, offset or length");
    return 0;
  }
  return 1;
}

/* trySend(socketFd, header, fileFd, offset, length, done) -> bytes sent in all, now, without waiting */
static napi_value try_send(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6], v;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  send_state s;
  if (argc != 6 || !read_args(env, argv, &s)) {
    if (argc != 6) napi_throw_type_error(env, NULL, "trySend takes 6 arguments");
    return NULL;
  }
  int e = send_some(&s);
  if (e && e != EAGAIN) {
    napi_throw(env, errno_error(env, e, "sendfile"));
    return NULL;
  }
  CHECK(napi_create_double(env, (double)s.done, &v));
  return v;
}

/* sendFile(socketFd, header, fileFd, offset, length, done, cancel) -> Promise<bytes>, on the pool */
static napi_value send_file(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7], promise, name;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  send_state s;
  napi_typedarray_type type;
  size_t count, byte_offset;
  void *base;
  napi_value ab;
  if (argc != 7) {
    napi_throw_type_error(env, NULL, "sendFile takes 7 arguments");
    return NULL;
  }
  if (!read_args(env, argv, &s)) return NULL;
  if (napi_get_typedarray_info(env, argv[6], &type, &count, &base, &ab, &byte_offset) != napi_ok || type != napi_int32_array ||
      count < 1) {
    napi_throw_type_error(env, NULL, "sendFile: cancel must be an Int32Array");
    return NULL;
  }
  send_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "sendFile: out of memory");
    return NULL;
  }
  j->st = s;
  j->cancel = (volatile int32_t *)base;
  /* keep the header and the cancel flag alive while a pool thread uses them */
  if (napi_create_reference(env, argv[1], 1, &j->header_ref) != napi_ok) {
    free(j);
    napi_throw_error(env, NULL, "sendFile: could not queue the request");
    return NULL;
  }
  if (napi_create_reference(env, argv[6], 1, &j->cancel_ref) != napi_ok) {
    napi_delete_reference(env, j->header_ref);
    free(j);
    napi_throw_error(env, NULL, "sendFile: could not queue the request");
    return NULL;
  }
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "qcowkit_sendfile", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, send_execute, send_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    napi_delete_reference(env, j->header_ref);
    napi_delete_reference(env, j->cancel_ref);
    free(j);
    napi_throw_error(env, NULL, "sendFile: could not queue the request");
    return NULL;
  }
  return promise;
}

#endif

static napi_value init(napi_env env, napi_value exports) {
  napi_value v;
#ifdef HAVE_SENDFILE
  CHECK(napi_create_function(env, "sendFile", NAPI_AUTO_LENGTH, send_file, NULL, &v));
  CHECK(napi_set_named_property(env, exports, "sendFile", v));
  CHECK(napi_create_function(env, "trySend", NAPI_AUTO_LENGTH, try_send, NULL, &v));
  CHECK(napi_set_named_property(env, exports, "trySend", v));
  CHECK(napi_get_boolean(env, true, &v));
#else
  CHECK(napi_get_boolean(env, false, &v));
#endif
  CHECK(napi_set_named_property(env, exports, "supported", v));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
