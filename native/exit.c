/*
 * qcowkit_exit: end the process at once, as the launcher does once a command is over.
 *
 *   exitNow(code) -> never returns
 *     _exit(2) with `code`. Node's own exit, once its event loop is empty, still tears everything
 *     down first — the environment's cleanup hooks, the V8 heap, the platform's threads, static
 *     destructors — which took 5-15 ms of a 0.25 s convert (`npm run bench`). The launcher calls
 *     this from 'beforeExit', that is when Node has found nothing left to do, and only when
 *     nothing else listens for 'beforeExit' or 'exit' (see bin/qcowkit). Output and written data
 *     are then already with the kernel; nothing of Node's teardown reaches disk or a pipe.
 */
#include <node_api.h>
#include <stdlib.h>
#ifdef _WIN32
#include <process.h>
#else
#include <unistd.h>
#endif

static napi_value exit_now(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t code = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], &code) != napi_ok) {
    napi_throw_type_error(env, NULL, "exitNow(code): a number expected");
    return NULL;
  }
  _exit(code & 0xff);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "exitNow", NAPI_AUTO_LENGTH, exit_now, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "exitNow", fn) != napi_ok) {
    napi_throw_error(env, NULL, "qcowkit_exit: init failed");
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
