/** The one error type of qcowkit: a stable code and a one-line, user-facing message. */
export type ErrorCode =
  | 'EINVAL' // invalid argument / option
  | 'ENOENT' // file not found
  | 'EIO' // I/O error or corrupt data found while reading
  | 'ECORRUPT' // image metadata is invalid (hostile or damaged image)
  | 'ENOTSUP' // feature not supported
  | 'EPERM' // operation not permitted (e.g. write to read-only image)
  | 'ERANGE' // out of range
  | 'EFBIG' // too big
  | 'EEXIST'; // already exists

export class QcowError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'QcowError';
    this.code = code;
  }
}

export function invalid(message: string): QcowError {
  return new QcowError('EINVAL', message);
}
export function corrupt(message: string): QcowError {
  return new QcowError('ECORRUPT', message);
}
export function unsupported(message: string): QcowError {
  return new QcowError('ENOTSUP', message);
}
export function ioError(message: string): QcowError {
  return new QcowError('EIO', message);
}
