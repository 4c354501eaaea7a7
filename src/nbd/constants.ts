/**
 * NBD protocol numbers (NetworkBlockDevice/nbd doc/proto.md): magics, handshake and transmission
 * flags, options and option replies, commands, reply chunk types, errors, and the limits this server
 * enforces on clients.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags.
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_ROTATIONAL = 1 << 4;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_RESIZE = 1 << 9;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_PEEK_EXPORT = 4;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;

// NBD_REP_INFO types.
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_RESIZE = 8;

// Command flags.
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply flags and chunk types.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// base:allocation status flags.
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
// qemu:dirty-bitmap:NAME status flag.
export const STATE_DIRTY = 1 << 0;

// Error values sent on the wire.
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

// Meta contexts.
export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const CONTEXT_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

// Limits.
/** Largest READ/WRITE payload (as qemu-nbd): larger requests get EINVAL. */
export const MAX_BUFFER = 32 * 1024 * 1024;
/** Longest string (export name, description, query) the protocol allows. */
export const MAX_STRING = 4096;
/** Largest option payload accepted; anything longer is a hostile client and is disconnected. */
export const MAX_OPTION_LENGTH = 1024 * 1024;
/** Most queries in one LIST/SET_META_CONTEXT. */
export const MAX_META_QUERIES = 256;
/** Requests processed concurrently per connection (more wait in the socket). */
export const MAX_REQUESTS_IN_FLIGHT = 16;
/** Payload bytes (read buffers and write payloads) in flight per connection. */
export const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
/** Stop reading requests while more reply bytes than this wait unsent in the socket. */
export const MAX_UNSENT_REPLY_BYTES = 8 * 1024 * 1024;
/** Extents returned per context per BLOCK_STATUS (qemu: 1 MiB of descriptors). */
export const MAX_BLOCK_STATUS_EXTENTS = (1024 * 1024) / 8;
/** A client must finish option negotiation within this many milliseconds. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Block size constraints advertised with NBD_INFO_BLOCK_SIZE. */
export const BLOCK_SIZE_MIN = 1;
export const BLOCK_SIZE_PREFERRED = 4096;
export const BLOCK_SIZE_MAX = MAX_BUFFER;

export function optionName(opt: number): string {
  const names: Record<number, string> = {
    [OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
    [OPT_ABORT]: 'NBD_OPT_ABORT',
    [OPT_LIST]: 'NBD_OPT_LIST',
    [OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
    [OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
    [OPT_INFO]: 'NBD_OPT_INFO',
    [OPT_GO]: 'NBD_OPT_GO',
    [OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
    [OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
    [OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
    [OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
  };
  return names[opt] ?? `option ${opt}`;
}
