/*
 * qcowkit_writer: one writing thread per file, as qemu-img's ordered writes.
 *
 * Buffered writes to one file serialise in the kernel anyway (the inode lock): several of them
 * at once from the libuv pool only spin on that lock, burning the CPU the copy needs. Here the
 * writes of a file go to its own thread, which does them one after the other in the order they
 * were made, without going back to JavaScript between two of them.
 *
 *   open(fd) -> writer
 *     Starts the thread. The descriptor stays the caller's (it is never closed here).
 *   write(writer, uint8array, offset, allocate) -> Promise<void>
 *     pwrite(2) of the whole array at `offset`. With `allocate`, the range is first fallocate(2)d
 *     (Linux): a write into allocated (unwritten) blocks costs the file system less than one that
 *     must reserve delayed-allocation blocks page by page. Where fallocate is not supported, it is
 *     not tried again for this writer; other fallocate failures are ignored (the write itself
 *     reports the real error). The array must not change until the promise settles.
 *     Rejects with an Error whose message is strerror's ("No space left on device") and whose
 *     `code` is the errno name (ENOSPC, EIO, ...).
 *   close(writer) -> undefined
 *     Waits for the writes in progress and stops the thread. Writes made after it reject.
 */
#include <node_api.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <fcntl.h>
#if defined(__linux__)
#include <linux/falloc.h>
#endif

#define CHECK(call)                                                    \
  do {                                                                 \
    if ((call) != napi_ok) {                                           \
      napi_throw_error(env, NULL, "qcowkit_writer: " #call " failed"); \
      return NULL;                                                     \
    }                                                                  \
  } while (0)

typedef struct req {
  struct req *next;
  uint8_t *data;
  size_t len;
  int64_t offset;
  int allocate;
  int err;
  napi_ref buffer;
  napi_deferred deferred;
} req;

typedef struct {
  int fd;
  int closed;       /* close() was called: no more writes (main thread only) */
  int stopping;     /* the thread is to end once the queue is empty */
  int can_allocate; /* fallocate not (yet) refused by the file system */
  int started;
  int refd;         /* the threadsafe function keeps the loop alive */
  int owners;       /* the JS object and the threadsafe function: freed when both are gone */
  size_t pending;   /* writes not yet settled (main thread only) */
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  req *queue, *queue_tail; /* to write, in order */
  req *done, *done_tail;   /* written, to settle on the main thread */
  napi_threadsafe_function tsfn;
} writer;

static const char *errno_code(int e) {
  switch (e) {
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case ENOSPC: return "ENOSPC";
    case EFBIG: return "EFBIG";
    case EDQUOT: return "EDQUOT";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case EACCES: return "EACCES";
    case ENOMEM: return "ENOMEM";
    default: return "EIO";
  }
}

static void do_write(writer *w, req *r) {
#if defined(__linux__)
  if (r->allocate && w->can_allocate) {
    int a;
    do {
      a = fallocate(w->fd, 0, (off_t)r->offset, (off_t)r->len);
    } while (a < 0 && errno == EINTR);
    if (a < 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) w->can_allocate = 0;
  }
#endif
  size_t done = 0;
  while (done < r->len) {
    ssize_t n = pwrite(w->fd, r->data + done, r->len - done, (off_t)(r->offset + (int64_t)done));
    if (n < 0) {
      if (errno == EINTR) continue;
      r->err = errno;
      return;
    }
    if (n == 0) {
      r->err = EIO;
      return;
    }
    done += (size_t)n;
  }
}

static void *run(void *arg) {
  writer *w = arg;
  pthread_mutex_lock(&w->lock);
  for (;;) {
    while (!w->queue && !w->stopping) pthread_cond_wait(&w->wake, &w->lock);
    if (!w->queue) break;
    req *r = w->queue;
    w->queue = r->next;
    if (!w->queue) w->queue_tail = NULL;
    pthread_mutex_unlock(&w->lock);
    do_write(w, r);
    pthread_mutex_lock(&w->lock);
    r->next = NULL;
    int first = w->done == NULL;
    if (w->done_tail) w->done_tail->next = r;
    else w->done = r;
    w->done_tail = r;
    /* one call settles everything finished by then */
    if (first) napi_call_threadsafe_function(w->tsfn, NULL, napi_tsfn_nonblocking);
  }
  pthread_mutex_unlock(&w->lock);
  return NULL;
}

/* On the main thread: settle the finished writes. */
static void settle(napi_env env, napi_value js_cb, void *context, void *data) {
  (void)js_cb;
  (void)data;
  writer *w = context;
  pthread_mutex_lock(&w->lock);
  req *r = w->done;
  w->done = w->done_tail = NULL;
  pthread_mutex_unlock(&w->lock);
  while (r) {
    req *next = r->next;
    if (env) {
      napi_value v;
      if (r->err == 0) {
        napi_get_undefined(env, &v);
        napi_resolve_deferred(env, r->deferred, v);
      } else {
        napi_value m, c;
        napi_create_string_utf8(env, strerror(r->err), NAPI_AUTO_LENGTH, &m);
        napi_create_string_utf8(env, errno_code(r->err), NAPI_AUTO_LENGTH, &c);
        napi_create_error(env, c, m, &v);
        napi_reject_deferred(env, r->deferred, v);
      }
      napi_delete_reference(env, r->buffer);
    }
    free(r);
    w->pending--;
    r = next;
  }
  if (env && w->pending == 0 && w->refd) {
    napi_unref_threadsafe_function(env, w->tsfn);
    w->refd = 0;
  }
}

static void stop(writer *w) {
  if (!w->started) return;
  pthread_mutex_lock(&w->lock);
  w->stopping = 1;
  pthread_cond_signal(&w->wake);
  pthread_mutex_unlock(&w->lock);
  pthread_join(w->thread, NULL);
  w->started = 0;
}

static void drop_owner(writer *w) {
  if (--w->owners > 0) return;
  pthread_mutex_destroy(&w->lock);
  pthread_cond_destroy(&w->wake);
  free(w);
}

/* The threadsafe function is gone (released, or its environment ends). */
static void tsfn_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  drop_owner(data);
}

/* The JS object was collected (normally after close()). */
static void finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  writer *w = data;
  if (!w->closed) {
    w->closed = 1;
    stop(w);
    napi_release_threadsafe_function(w->tsfn, napi_tsfn_release);
  }
  drop_owner(w);
}

static napi_value w_open(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result, name;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  if (argc != 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, NULL, "open(fd): a file descriptor expected");
    return NULL;
  }
  writer *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "qcowkit_writer: out of memory");
    return NULL;
  }
  w->fd = fd;
  w->can_allocate = 1;
  w->owners = 2;
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->wake, NULL);
  CHECK(napi_create_string_utf8(env, "qcowkit_writer", NAPI_AUTO_LENGTH, &name));
  if (napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, w, tsfn_finalize, w, settle, &w->tsfn) != napi_ok) {
    free(w);
    napi_throw_error(env, NULL, "qcowkit_writer: could not create the completion callback");
    return NULL;
  }
  napi_unref_threadsafe_function(env, w->tsfn);
  if (pthread_create(&w->thread, NULL, run, w) != 0) {
    w->owners = 1; /* the threadsafe function's finalizer frees it */
    w->closed = 1;
    napi_release_threadsafe_function(w->tsfn, napi_tsfn_abort);
    napi_throw_error(env, "EAGAIN", "qcowkit_writer: could not start a thread");
    return NULL;
  }
  w->started = 1;
  CHECK(napi_create_external(env, w, finalize, NULL, &result));
  return result;
}

static napi_value w_write(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  writer *w;
  bool is_ta, allocate;
  int64_t offset;
  if (argc != 4 || napi_get_value_external(env, argv[0], (void **)&w) != napi_ok ||
      napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0 ||
      napi_get_value_bool(env, argv[3], &allocate) != napi_ok) {
    napi_throw_type_error(env, NULL, "write(writer, uint8array, offset, allocate): bad arguments");
    return NULL;
  }
  napi_typedarray_type type;
  size_t length, byte_offset;
  void *base;
  napi_value ab;
  CHECK(napi_get_typedarray_info(env, argv[1], &type, &length, &base, &ab, &byte_offset));
  if (type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "write: a Uint8Array expected");
    return NULL;
  }
  napi_value promise;
  req *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "qcowkit_writer: out of memory");
    return NULL;
  }
  if (napi_create_promise(env, &r->deferred, &promise) != napi_ok) {
    free(r);
    napi_throw_error(env, NULL, "qcowkit_writer: could not create a promise");
    return NULL;
  }
  if (w->closed) {
    napi_value m, c, e;
    napi_create_string_utf8(env, "write after close", NAPI_AUTO_LENGTH, &m);
    napi_create_string_utf8(env, "EBADF", NAPI_AUTO_LENGTH, &c);
    napi_create_error(env, c, m, &e);
    napi_reject_deferred(env, r->deferred, e);
    free(r);
    return promise;
  }
  if (napi_create_reference(env, argv[1], 1, &r->buffer) != napi_ok) {
    napi_value e, m;
    napi_create_string_utf8(env, "qcowkit_writer: could not hold the buffer", NAPI_AUTO_LENGTH, &m);
    napi_create_error(env, NULL, m, &e);
    napi_reject_deferred(env, r->deferred, e);
    free(r);
    return promise;
  }
  r->data = base;
  r->len = length;
  r->offset = offset;
  r->allocate = allocate;
  if (w->pending++ == 0 && !w->refd) {
    napi_ref_threadsafe_function(env, w->tsfn);
    w->refd = 1;
  }
  pthread_mutex_lock(&w->lock);
  if (w->queue_tail) w->queue_tail->next = r;
  else w->queue = r;
  w->queue_tail = r;
  pthread_cond_signal(&w->wake);
  pthread_mutex_unlock(&w->lock);
  return promise;
}

static napi_value w_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], undef;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  writer *w;
  if (argc != 1 || napi_get_value_external(env, argv[0], (void **)&w) != napi_ok) {
    napi_throw_type_error(env, NULL, "close(writer): a writer expected");
    return NULL;
  }
  if (!w->closed) {
    w->closed = 1;
    stop(w);
    settle(env, NULL, w, NULL); /* whatever finished since the last callback */
    napi_release_threadsafe_function(w->tsfn, napi_tsfn_release);
  }
  CHECK(napi_get_undefined(env, &undef));
  return undef;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  CHECK(napi_create_function(env, "open", NAPI_AUTO_LENGTH, w_open, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "open", fn));
  CHECK(napi_create_function(env, "write", NAPI_AUTO_LENGTH, w_write, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "write", fn));
  CHECK(napi_create_function(env, "close", NAPI_AUTO_LENGTH, w_close, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "close", fn));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
