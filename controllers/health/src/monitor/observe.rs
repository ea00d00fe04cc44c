//! What the loop does with what the driver said: sweeps and checks become
//! observations, observations become announcements queued for writers.

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use volplane_csi::CsiError;
use volplane_runtime::phase;

use super::{Done, LoopState, Source, WRITERS};
use crate::metrics::claim_labels;
use crate::model::{self, Condition, Observation, Watched};
use crate::node_watcher::NodeNote;

impl LoopState {
    /// A ListVolumes sweep that began at `started` ended.
    pub(super) fn swept(&mut self, started: Instant, result: Result<HashMap<String, Option<Condition>>, CsiError>) {
        self.sweeping = false;
        let Some(Source::ListVolumes { interval, .. }) = self.source.clone() else {
            return;
        };
        let listed = match result {
            Ok(listed) => listed,
            Err(error) if error.is_unimplemented() => return self.unusable(&error),
            Err(error) => {
                self.metrics.checked("error");
                let retry = (interval / 10).max(Duration::from_secs(1));
                warn!(%error, retry_in = ?retry, "ListVolumes sweep failed; conditions stay as they were");
                self.next_sweep = Some(Instant::now() + retry);
                return;
            }
        };
        if !self.is_current() {
            // The PVs are being re-listed: a volume missing from the driver
            // may be a PV deleted meanwhile. Sweep again once the list ends.
            debug!("ListVolumes sweep ended during a re-list; sweeping again after it");
            self.next_sweep = Some(Instant::now());
            return;
        }
        self.metrics.sweep_seconds.observe(started.elapsed().as_secs_f64());
        debug!(listed = listed.len(), watched = self.volumes.len(), took = ?started.elapsed(), "ListVolumes sweep done");
        let watched: Vec<Watched> = self.volumes.all().cloned().collect();
        for volume in watched {
            let observation = match listed.get(&volume.volume_handle) {
                Some(Some(condition)) => Observation::Reported(condition.clone()),
                Some(None) => Observation::Silent,
                // Bound after the sweep began: the next one judges.
                None if self.volumes.watched_after(&volume.pv, started) => continue,
                None => Observation::Missing {
                    how: "missing from ListVolumes",
                },
            };
            self.observe(&volume, &observation);
        }
        self.next_sweep = Some(started + interval);
    }

    /// The driver does not implement the call its capabilities promised:
    /// use the fallback if there is one, else stop checking (and stay up).
    pub(super) fn unusable(&mut self, error: &CsiError) {
        self.metrics.checked("unimplemented");
        self.checks.clear();
        self.sweeping = false;
        self.next_sweep = None;
        let fallback = self.config.fallback.clone().filter(|f| Some(f) != self.source.as_ref());
        match fallback {
            Some(fallback) => {
                error!(%error, fallback = ?fallback, "the CSI driver does not implement the call for volume conditions; using the fallback");
                self.use_source(Some(fallback));
            }
            None => {
                error!(%error, "the CSI driver does not implement the call for volume conditions; controller-side checks stop");
                self.use_source(None);
            }
        }
    }

    /// Switches to `source` and schedules its first checks.
    fn use_source(&mut self, source: Option<Source>) {
        self.metrics.set_source(source.as_ref().map_or("none", Source::label));
        self.source = source;
        match &self.source {
            Some(Source::ListVolumes { .. }) => self.next_sweep = Some(Instant::now()),
            Some(Source::GetVolume { interval, .. }) => {
                let now = Instant::now();
                let names: Vec<String> = self.volumes.names().cloned().collect();
                for name in names {
                    self.checks.schedule(&name, now + phase::phase(&name, *interval));
                }
            }
            None => {}
        }
    }

    pub(super) fn observe(&mut self, volume: &Watched, observation: &Observation) {
        self.metrics.checked(observation.label());
        let Some(condition) = observation.condition(&volume.volume_handle, &self.config.driver) else {
            return;
        };
        let labels = claim_labels(&volume.namespace, &volume.claim);
        match &condition {
            Condition::Abnormal(_) => {
                self.metrics.abnormal.get_or_create(&labels).set(1);
            }
            Condition::Normal => {
                self.metrics.abnormal.remove(&labels);
            }
        }
        let queued = &mut self.writes.queued;
        match model::announcement(self.volumes.announced(&volume.pv), &condition) {
            Some(announcement) => {
                queued.insert(volume.pv.clone(), (volume.clone(), condition, Some(announcement)));
            }
            None => {
                let recorded = self.volumes.recorded(&volume.pv).cloned();
                let wanted = matches!(condition, Condition::Abnormal(_)).then(|| condition.clone());
                if recorded != wanted && !self.writes.writing.contains(&volume.pv) {
                    debug!(pv = %volume.pv, "the PV annotation is behind the announced condition; writing it again");
                    queued.insert(volume.pv.clone(), (volume.clone(), condition, None));
                } else {
                    queued.remove(&volume.pv);
                }
            }
        }
    }

    pub(super) fn write_queued(&mut self) {
        let free = WRITERS.saturating_sub(self.writes.writing.len());
        let ready: Vec<String> = self
            .writes
            .queued
            .keys()
            .filter(|pv| !self.writes.writing.contains(*pv))
            .take(free)
            .cloned()
            .collect();
        for pv in ready {
            let Some((volume, condition, announcement)) = self.writes.queued.remove(&pv) else {
                continue;
            };
            self.writes.writing.insert(pv.clone());
            if let Some(announcement) = &announcement {
                info!(pv = %pv, namespace = %volume.namespace, claim = %volume.claim, reason = announcement.reason, note = %announcement.note, "volume condition changed");
            }
            let writer = self.writer.clone();
            self.tasks.push(
                async move {
                    let result = writer.announce(&volume, &condition, announcement.as_ref()).await;
                    Done::Announced { pv, condition, result }
                }
                .boxed(),
            );
        }
    }

    /// Publishes a node watcher note as a task.
    pub(super) fn publish_node_note(&mut self, volume: Watched, note: NodeNote) {
        let writer = self.writer.clone();
        self.tasks.push(
            async move {
                writer.publish_node_note(&volume, note).await;
                Done::Noted
            }
            .boxed(),
        );
    }
}
