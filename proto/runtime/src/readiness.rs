//! A controller's readiness: false until its caches have listed, then true
//! for good. `/readyz` reads it through [`Readiness::subscribe`].

use tokio::sync::watch;

/// Set once by a controller when its watches have all listed.
#[derive(Debug)]
pub struct Readiness(watch::Sender<bool>);

impl Default for Readiness {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Readiness {
    /// Not ready yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag, for `/readyz`.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Whether it has been marked ready.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Marks it ready (again is a no-op); `true` the first time.
    pub fn mark_ready(&self) -> bool {
        !self.0.send_replace(true)
    }

    /// Marks it ready once every one of `listed` has turned true (each a
    /// watch's "initial list done" flag); stays not ready if one of them
    /// is dropped first. `true` if this made it ready.
    pub async fn mark_ready_when_all(&self, listed: Vec<watch::Receiver<bool>>) -> bool {
        for mut flag in listed {
            if flag.wait_for(|done| *done).await.is_err() {
                return false;
            }
        }
        self.mark_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_after_every_watch_listed() {
        let readiness = Readiness::new();
        let seen = readiness.subscribe();
        let (pods, pods_listed) = watch::channel(false);
        let (claims, claims_listed) = watch::channel(false);
        pods.send_replace(true);
        let waiting = readiness.mark_ready_when_all(vec![pods_listed, claims_listed]);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "one watch has not listed"
        );
        assert!(!*seen.borrow());
        claims.send_replace(true);
        assert!(waiting.await, "this call made it ready");
        assert!(*seen.borrow());
        assert!(!readiness.mark_ready(), "the first mark was the one that counted");
    }

    #[tokio::test]
    async fn a_dropped_watch_never_makes_it_ready() {
        let readiness = Readiness::new();
        let (gone, listed) = watch::channel(false);
        drop(gone);
        assert!(!readiness.mark_ready_when_all(vec![listed]).await);
        assert!(!readiness.is_ready());
    }
}
