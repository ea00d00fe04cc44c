use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::CsiError;

/// Where a CSI driver listens: a unix socket path.
///
/// Accepts the spellings Kubernetes sidecars accept: `/path`,
/// `unix:///path` and `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsiAddress {
    path: PathBuf,
}

impl CsiAddress {
    /// The socket's filesystem path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl FromStr for CsiAddress {
    type Err = CsiError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| CsiError::InvalidAddress {
            address: raw.to_string(),
            reason: reason.to_string(),
        };
        let path = if let Some(rest) = raw.strip_prefix("unix://") {
            // `unix://` must be followed by an absolute path (`unix:///run/csi.sock`);
            // `unix://host/path` names an authority, which a unix socket has not.
            if !rest.starts_with('/') {
                return Err(invalid(
                    "unix:// must be followed by an absolute path, as in unix:///run/csi/socket",
                ));
            }
            rest
        } else if let Some(rest) = raw.strip_prefix("unix:") {
            rest
        } else if raw.contains("://") {
            return Err(invalid(
                "only unix sockets are supported (/path, unix:///path or unix:/path)",
            ));
        } else {
            raw
        };
        if path.is_empty() {
            return Err(invalid("the socket path is empty"));
        }
        if !path.starts_with('/') {
            return Err(invalid("the socket path must be absolute"));
        }
        Ok(Self {
            path: PathBuf::from(path),
        })
    }
}

impl fmt::Display for CsiAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<PathBuf, String> {
        raw.parse::<CsiAddress>()
            .map(|a| a.path().to_path_buf())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_the_three_spellings_of_a_unix_socket() {
        for raw in ["/csi/csi.sock", "unix:///csi/csi.sock", "unix:/csi/csi.sock"] {
            assert_eq!(parse(raw), Ok(PathBuf::from("/csi/csi.sock")), "{raw}");
        }
    }

    #[test]
    fn rejects_relative_empty_and_non_unix_addresses() {
        for raw in [
            "",
            "unix:",
            "unix://",
            "csi.sock",
            "unix:csi.sock",
            "tcp://127.0.0.1:10000",
            "unix://host/csi.sock",
        ] {
            let err = parse(raw).expect_err(raw);
            assert!(err.contains("invalid CSI address"), "{raw}: {err}");
        }
    }

    #[test]
    fn displays_as_a_unix_uri() {
        let address: CsiAddress = "unix:/run/x.sock".parse().expect("valid");
        assert_eq!(address.to_string(), "unix:///run/x.sock");
    }
}
