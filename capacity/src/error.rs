use volplane_csi::CsiError;

/// Result of capacity controller operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the capacity controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// GetCapacity failed or answered something unusable.
    #[error("GetCapacity failed: {0}")]
    Csi(#[source] CsiError),

    /// A write to the API server failed.
    #[error("cannot {verb} CSIStorageCapacity: {source}")]
    Write {
        verb: &'static str,
        #[source]
        source: kube::Error,
    },

    /// Reading something the controller needs at startup failed.
    #[error("{what}: {source}")]
    Startup {
        what: String,
        #[source]
        source: kube::Error,
    },

    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),

    /// The write was not made (or was abandoned): this process does not lead.
    #[error("{0}")]
    NotLeader(#[from] volplane_runtime::NotLeader),
}

impl Error {
    /// Retrying soon cannot help: the driver's answer or the API server's
    /// verdict will be the same until something changes (a permanent gRPC
    /// code, an answer with negative sizes, an object the API server rejects). Such an
    /// item waits for its next poll instead of backing off from 500 ms.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Csi(error) => !error.is_retryable(),
            Self::Write {
                source: kube::Error::Api(status),
                ..
            } => matches!(status.code, 400 | 422),
            _ => false,
        }
    }

    /// Whether the owner should hear about it (a Warning event): the driver
    /// failed or answered nonsense, or the API server rejects the object.
    pub fn is_announced(&self) -> bool {
        matches!(self, Self::Csi(_)) || self.is_permanent()
    }

    /// The write failed because the object no longer exists.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Write { source: kube::Error::Api(status), .. } if status.code == 404)
    }
}
