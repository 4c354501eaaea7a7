{
  "targets": [
    {
      "target_name": "qcowkit_sparse",
      "sources": ["sparse.c"],
      "defines": ["NAPI_VERSION=8", "_FILE_OFFSET_BITS=64", "_GNU_SOURCE"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "qcowkit_zlib",
      "sources": ["zlib.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "qcowkit_writer",
      "sources": ["writer.c"],
      "defines": ["NAPI_VERSION=8", "_FILE_OFFSET_BITS=64", "_GNU_SOURCE"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "qcowkit_exit",
      "sources": ["exit.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "qcowkit_sendfile",
      "sources": ["sendfile.c"],
      "defines": ["NAPI_VERSION=8", "_FILE_OFFSET_BITS=64", "_GNU_SOURCE"],
      "cflags": ["-Wall", "-Wextra"]
    }
  ]
}
