//! The dispatcher: due pods become tasks (claims to create, or a finished
//! pod's claims to release) while workers are free; a finished task's
//! outcome is recorded, and the pod is done, waits, or is retried.

use futures::FutureExt;
use tokio::time::Instant;
use tracing::warn;

use super::work::{PodWork, ReleaseWork, WorkIo};
use super::{Done, Handled, Key, LoopState, Timing};
use crate::error::{ClaimFailure, Error};
use crate::model::FailureReason;

impl LoopState {
    fn work_io(&self) -> WorkIo {
        WorkIo {
            client: self.client.clone(),
            recorder: self.recorder.clone(),
            leadership: self.leadership.clone(),
            metrics: self.metrics.clone(),
        }
    }

    pub(super) fn has_free_worker(&self) -> bool {
        self.tasks.len() < usize::from(self.config.workers.max(1))
    }

    pub(super) fn dispatch(&mut self) {
        if !self.current || !self.leading {
            return;
        }
        let now = Instant::now();
        while self.has_free_worker() {
            let Some(key) = self.queue.pop_due(now) else {
                break;
            };
            let Some(state) = self.pods.get(&key) else {
                self.queue.finish(&key);
                continue;
            };
            let needs = self.needs(&key, state);
            if needs.is_empty() {
                self.queue.finish(&key);
                self.queue.succeeded(&key);
                // A finished pod with nothing to release is not kept.
                self.look_at(&key);
                continue;
            }
            if let Some(finished) = state.finished.clone() {
                let state = state.clone();
                let needs = self.not_in_use(&key, &state, needs);
                let timing = if needs.is_empty() {
                    Timing::Later
                } else {
                    self.release_timing(&key, &finished)
                };
                let Timing::Now { node } = timing else {
                    // Scheduled for later, or waiting for its node or a claim's users.
                    self.queue.finish(&key);
                    continue;
                };
                let work = ReleaseWork {
                    io: self.work_io(),
                    pod: key,
                    state,
                    finished,
                    node,
                    needs,
                };
                self.tasks.push(work.run().boxed());
                continue;
            }
            let work = PodWork {
                io: self.work_io(),
                pod: key.clone(),
                state: state.clone(),
                needs,
            };
            self.tasks.push(work.run().boxed());
        }
    }

    pub(super) fn handled(&mut self, handled: Handled) {
        let Handled { pod, uid, outcomes } = handled;
        self.queue.finish(&pod);
        let current = self.pods.get(&pod).is_some_and(|state| state.uid == uid);
        let (failures, waiting_since) = self.record_outcomes(&pod, &uid, outcomes);
        if !current {
            // Deleted, finished or replaced by a pod of the same name meanwhile.
            self.look_at(&pod);
            return;
        }
        self.blocked.retain(|_, waiting| *waiting != pod);
        if failures.iter().any(|f| f.reason == FailureReason::NotLeader) {
            // Leadership ended meanwhile; the next leader (maybe this one) redoes the pod.
            self.metrics.reconciled("not_leading");
            return;
        }
        if let Some(generation) = waiting_since {
            self.wait_for_volumes_in_use(&pod, generation);
        }
        if failures.is_empty() {
            self.set_failing(&pod, None);
            self.queue.succeeded(&pod);
            self.metrics.reconciled("ok");
            if waiting_since.is_none() {
                self.look_at(&pod);
            }
            return;
        }
        self.retry_later(pod, failures);
    }

    /// What the pod's work did to its claims, known at once (the claim
    /// watch confirms it later); returns the failures and, if its node
    /// still uses a volume, the node's generation then.
    fn record_outcomes(
        &mut self,
        pod: &Key,
        uid: &str,
        outcomes: Vec<Result<Done, ClaimFailure>>,
    ) -> (Vec<ClaimFailure>, Option<u64>) {
        let claim_key = |claim: String| Key {
            namespace: pod.namespace.clone(),
            name: claim.into(),
        };
        let mut failures = Vec::new();
        let mut waiting_since = None;
        for outcome in outcomes {
            match outcome {
                // Known at once: a pod event before the watch confirms it creates nothing twice.
                Ok(Done::Created(claim)) => {
                    self.claims.insert(claim_key(claim), Some(uid.into()));
                }
                // Gone (the watch confirms it).
                Ok(Done::Released(claim)) => {
                    self.claims.remove(&claim_key(claim));
                }
                // Not the pod's to release after all: nothing more to do
                // for it until the watch says otherwise.
                Ok(Done::Untouched(claim)) => {
                    if let Some(owner) = self.claims.get_mut(&claim_key(claim)) {
                        *owner = None;
                    }
                }
                Ok(Done::Waiting { generation }) => waiting_since = Some(generation),
                Err(failure) => failures.push(failure),
            }
        }
        (failures, waiting_since)
    }

    /// The pod's claims failed: blocked by the foreign claims of their
    /// names, retried with backoff.
    fn retry_later(&mut self, pod: Key, failures: Vec<ClaimFailure>) {
        self.metrics.reconciled("failed");
        let reason = failures
            .iter()
            .map(|f| f.reason)
            .find(|r| *r != FailureReason::NotLeader);
        self.set_failing(&pod, reason);
        for failure in &failures {
            if failure.reason == FailureReason::Conflict {
                let claim = Key {
                    namespace: pod.namespace.clone(),
                    name: failure.claim.as_str().into(),
                };
                self.blocked.insert(claim, pod.clone());
            }
        }
        let attempts = self.queue.failed(&pod);
        let delay = self.config.backoff.delay(attempts);
        warn!(%pod, error = %Error::Claims(failures), retry_in = ?delay, "ephemeral volumes not handled; retrying");
        self.queue.schedule(pod, Instant::now() + delay);
    }
}

impl LoopState {
    /// Pod `pod`'s claims fail for `reason`, or (`None`) no longer do:
    /// `volplane_ephemeral_claims_failing` follows, one pod at a time.
    pub(super) fn set_failing(&mut self, pod: &Key, reason: Option<FailureReason>) {
        let before = match reason {
            Some(reason) => self.failing.insert(pod.clone(), reason),
            None => self.failing.remove(pod),
        };
        if before == reason {
            return;
        }
        if let Some(before) = before {
            self.metrics.failing(before).dec();
        }
        if let Some(reason) = reason {
            self.metrics.failing(reason).inc();
        }
    }
}
