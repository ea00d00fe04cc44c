//! The write permission a controller holds, as seen by the controller.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// Whether this process may write for a controller group, and until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// Another process leads, or nobody does yet.
    Following,
    /// This process leads; without a renewal it must stop writing at
    /// `until` (`None`: no election, it always leads).
    Leading {
        /// Counts the terms of this process; a renewal keeps the number.
        number: u64,
        /// End of the term unless renewed.
        until: Option<SystemTime>,
    },
}

impl Term {
    /// Whether writes are allowed at `now`.
    pub fn allows(self, now: SystemTime) -> bool {
        match self {
            Self::Following => false,
            Self::Leading { until: None, .. } => true,
            Self::Leading { until: Some(until), .. } => now < until,
        }
    }

    /// How long writes stay allowed from `now` without a renewal (`None`: forever).
    fn remaining(self, now: SystemTime) -> Option<Duration> {
        match self {
            Self::Leading { until: Some(until), .. } => Some(until.duration_since(now).unwrap_or_default()),
            _ => None,
        }
    }
}

/// Refusal to write without leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not the leader (the lease is held by another instance or its renewal is overdue)")]
pub struct NotLeader;

/// A controller's view of its leadership. Every write goes through
/// [`Leadership::guard`]: refused when not leading, cut off the moment the
/// term ends.
#[derive(Clone, Debug)]
pub struct Leadership {
    term: watch::Receiver<Term>,
    /// Keeps the channel open for [`Leadership::unconditional`].
    _always: Option<std::sync::Arc<watch::Sender<Term>>>,
}

impl Leadership {
    /// Leadership that follows `term`, as published by an elector.
    pub fn new(term: watch::Receiver<Term>) -> Self {
        Self { term, _always: None }
    }

    /// Leadership without election: always leading (per-node mode,
    /// `--leader-election=false`).
    pub fn unconditional() -> Self {
        let (sender, term) = watch::channel(Term::Leading { number: 0, until: None });
        Self {
            term,
            _always: Some(std::sync::Arc::new(sender)),
        }
    }

    /// Whether writes are allowed now.
    pub fn may_write(&self) -> bool {
        self.term.borrow().allows(SystemTime::now())
    }

    /// Completes once writes are allowed.
    pub async fn gained(&mut self) {
        loop {
            let term = *self.term.borrow_and_update();
            if term.allows(SystemTime::now()) {
                return;
            }
            if self.term.changed().await.is_err() {
                // The elector is gone: leadership never comes.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Completes once writes are no longer allowed: the term ended, was
    /// not renewed in time, or the elector stopped.
    pub async fn lost(&mut self) {
        loop {
            let term = *self.term.borrow_and_update();
            let now = SystemTime::now();
            if !term.allows(now) {
                return;
            }
            let remaining = term.remaining(now);
            tokio::select! {
                changed = self.term.changed() => {
                    if changed.is_err() {
                        if remaining.is_none() {
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                }
                () = tokio::time::sleep(remaining.unwrap_or_default()), if remaining.is_some() => return,
            }
        }
    }

    /// Completes once leadership differs from `leading` (what the caller
    /// last acted on): [`Leadership::lost`] when it was leading, else
    /// [`Leadership::gained`]. For a controller loop's wake-up.
    pub async fn changed_from(&self, leading: bool) {
        let mut watcher = self.clone();
        if leading {
            watcher.lost().await;
        } else {
            watcher.gained().await;
        }
    }

    /// Runs the write `write` if leading, and abandons it (dropping the
    /// request) the moment leadership ends.
    pub async fn guard<F: Future>(&self, write: F) -> Result<F::Output, NotLeader> {
        if !self.may_write() {
            return Err(NotLeader);
        }
        let mut watcher = self.clone();
        tokio::select! {
            biased;
            () = watcher.lost() => Err(NotLeader),
            output = write => Ok(output),
        }
    }

    /// A stream that yields each time writes become allowed: at the start
    /// of every term (a loss and regain too quick to observe still counts,
    /// because every term has its own number) and when an overdue term is
    /// renewed. The moment to catch up on work skipped while not leading.
    pub fn gains(self) -> futures::stream::BoxStream<'static, ()> {
        use futures::StreamExt as _;
        futures::stream::unfold((self, None), |(mut leadership, last): (Self, Option<u64>)| async move {
            if let Some(number) = last {
                let mut other = leadership.clone();
                tokio::select! {
                    () = leadership.lost() => {}
                    () = other.next_term(number) => {}
                }
            }
            leadership.gained().await;
            let number = match *leadership.term.borrow() {
                Term::Leading { number, .. } => number,
                Term::Following => 0,
            };
            Some(((), (leadership, Some(number))))
        })
        .boxed()
    }

    /// Completes once a term other than `number` is published.
    async fn next_term(&mut self, number: u64) {
        loop {
            if matches!(*self.term.borrow_and_update(), Term::Leading { number: n, .. } if n != number) {
                return;
            }
            if self.term.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading_for(number: u64, duration: Duration) -> Term {
        Term::Leading {
            number,
            until: Some(SystemTime::now() + duration),
        }
    }

    #[test]
    fn a_term_allows_writes_only_before_its_end() {
        let now = SystemTime::now();
        assert!(!Term::Following.allows(now));
        assert!(Term::Leading { number: 0, until: None }.allows(now));
        let until = Some(now + Duration::from_secs(1));
        assert!(Term::Leading { number: 1, until }.allows(now));
        assert!(!Term::Leading { number: 1, until }.allows(now + Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn an_expiring_term_is_lost_without_any_message() {
        let (_sender, term) = watch::channel(leading_for(1, Duration::from_millis(50)));
        let mut leadership = Leadership::new(term);
        assert!(leadership.may_write());
        tokio::time::timeout(Duration::from_secs(5), leadership.lost())
            .await
            .expect("the term ends by itself");
        assert!(!leadership.may_write());
    }

    #[tokio::test]
    async fn guard_refuses_when_following_and_cuts_off_at_loss() {
        let (sender, term) = watch::channel(Term::Following);
        let leadership = Leadership::new(term);
        assert_eq!(leadership.guard(async { 1 }).await, Err(NotLeader));

        sender.send_replace(leading_for(1, Duration::from_secs(60)));
        assert_eq!(leadership.guard(async { 2 }).await, Ok(2));

        let pending_write = leadership.guard(std::future::pending::<()>());
        let stepping_down = async {
            tokio::task::yield_now().await;
            sender.send_replace(Term::Following);
        };
        let (cut, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(pending_write, stepping_down)
        })
        .await
        .expect("the write is abandoned at once");
        assert_eq!(cut, Err(NotLeader));
    }

    #[tokio::test]
    async fn unconditional_leadership_is_never_lost() {
        let mut leadership = Leadership::unconditional();
        assert!(leadership.may_write());
        let lost = tokio::time::timeout(Duration::from_millis(100), leadership.lost()).await;
        assert!(lost.is_err(), "unconditional leadership must not end");
    }

    #[tokio::test]
    async fn gains_yields_once_per_term() {
        use futures::StreamExt as _;
        let (sender, term) = watch::channel(Term::Following);
        let mut gains = Leadership::new(term).gains();
        async fn next(
            gains: &mut futures::stream::BoxStream<'static, ()>,
        ) -> Result<Option<()>, tokio::time::error::Elapsed> {
            tokio::time::timeout(Duration::from_millis(200), gains.next()).await
        }
        assert!(next(&mut gains).await.is_err(), "no gain while following");
        sender.send_replace(leading_for(1, Duration::from_secs(60)));
        assert_eq!(next(&mut gains).await, Ok(Some(())));
        // A renewal is not a new gain.
        sender.send_replace(leading_for(1, Duration::from_secs(90)));
        assert!(next(&mut gains).await.is_err(), "a renewal is not a gain");
        // A loss and regain too quick to see is still a new term.
        sender.send_replace(Term::Following);
        sender.send_replace(leading_for(2, Duration::from_secs(60)));
        assert_eq!(next(&mut gains).await, Ok(Some(())));
        // A term that ran out and was renewed late allows writes again.
        sender.send_replace(leading_for(2, Duration::from_millis(30)));
        assert_eq!(next(&mut gains).await.ok(), None, "not a gain while the term lasts");
        sender.send_replace(leading_for(2, Duration::from_secs(60)));
        assert_eq!(next(&mut gains).await, Ok(Some(())));
    }
}
