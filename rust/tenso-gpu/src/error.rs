use std::fmt;

/// Why a GPU operation could not run.
#[derive(Debug)]
#[non_exhaustive]
pub enum GpuError {
    /// The NVIDIA driver library (`libcuda.so.1` / `nvcuda.dll`) could not be loaded.
    NoDriver,
    /// This build of tenso-gpu has no CUDA support (feature `cuda` off).
    NotBuilt,
    /// A driver call failed.
    Driver {
        /// The driver function, e.g. `cuMemHostAlloc`.
        call: &'static str,
        /// The driver's name for the error, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
    },
    /// The device ordinal is not one the driver reports.
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: i32,
        /// How many devices the driver sees.
        count: i32,
    },
    /// A copy range does not fit the staging buffer or overflows.
    BadLength {
        /// The length asked for.
        len: usize,
    },
    /// The reader or writer on the host side of a copy failed.
    Io(std::io::Error),
    /// The packet read from a stream is malformed, over a limit, truncated or fails its integrity check.
    Format(tenso_format::FormatError),
    /// The packet is valid but cannot go to a device this way (e.g. a sparse matrix or a compressed packet).
    Unsupported {
        /// What was found.
        what: String,
    },
    /// A device tensor handed in cannot be written as it is (strided, on another device, unknown element type).
    BadTensor {
        /// Why.
        reason: String,
    },
    /// This process was forked from one that had opened a device: the parent's contexts, streams and pinned
    /// memory are not valid here (CUDA does not survive `fork`).
    Forked {
        /// The process that opened the device.
        parent: u32,
    },
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver => f.write_str(
                "the NVIDIA driver library (libcuda) was not found: no NVIDIA driver is installed",
            ),
            Self::NotBuilt => {
                f.write_str("tenso-gpu was built without CUDA support (feature \"cuda\")")
            }
            Self::Driver { call, name } => write!(f, "{call} failed: {name}"),
            Self::NoSuchDevice { ordinal, count } => {
                write!(
                    f,
                    "CUDA device {ordinal} does not exist: the driver reports {count} device(s)"
                )
            }
            Self::BadLength { len } => write!(f, "copy length {len} does not fit"),
            Self::Io(e) => write!(f, "host side of a device copy failed: {e}"),
            Self::Format(e) => e.fmt(f),
            Self::Unsupported { what } => {
                write!(
                    f,
                    "{what} cannot be read to a device; only dense packets and bundles of them can"
                )
            }
            Self::BadTensor { reason } => f.write_str(reason),
            Self::Forked { parent } => write!(
                f,
                "this process was forked from process {parent} after it had used CUDA through tenso; CUDA cannot \
                 be used in a forked child (start worker processes with the 'spawn' or 'forkserver' method)"
            ),
        }
    }
}

impl std::error::Error for GpuError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::Format(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for GpuError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
