//! The health controller's calls: ListVolumes sweeps and
//! ControllerGetVolume checks to the driver, announcements and node
//! notes to the API server (events on the PVC, annotations on the PV).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference, PersistentVolume};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder};
use tonic::Code;
use tracing::{debug, info, warn};
use volplane_csi::{CsiClient, CsiError};
use volplane_runtime::events::{self, Published};
use volplane_runtime::{Leadership, NotLeader};

use crate::Error;
use crate::metrics::HealthMetrics;
use crate::model::{self, Announcement, Condition, Observation, Watched};
use crate::node_watcher::NodeNote;

/// Sweeps restarted after ABORTED (a stale token) before the sweep fails.
const SWEEP_RESTARTS: usize = 3;

/// One full ListVolumes sweep: every page, restarted on ABORTED.
pub(crate) async fn sweep(csi: &CsiClient, page_size: i32) -> Result<HashMap<String, Option<Condition>>, CsiError> {
    let mut attempt = 0;
    'sweep: loop {
        let mut listed = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            match csi.list_volumes(page_size, token.as_deref()).await {
                Ok(page) => {
                    for entry in page.entries {
                        let Some(volume) = entry.volume else {
                            continue;
                        };
                        let condition = entry
                            .status
                            .and_then(|s| s.volume_condition)
                            .map(|c| model::condition_of(c.abnormal, &c.message));
                        listed.insert(volume.volume_id, condition);
                    }
                    match page.next_token {
                        Some(next) => token = Some(next),
                        None => return Ok(listed),
                    }
                }
                Err(error) if error.code() == Some(Code::Aborted) && attempt < SWEEP_RESTARTS => {
                    attempt += 1;
                    debug!(%error, attempt, "ListVolumes token went stale; restarting the sweep");
                    continue 'sweep;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// One ControllerGetVolume check.
pub(crate) async fn check(csi: &CsiClient, volume_handle: &str) -> Result<Observation, CsiError> {
    match csi.controller_get_volume(volume_handle).await {
        Ok(response) => Ok(response
            .status
            .and_then(|s| s.volume_condition)
            .map_or(Observation::Silent, |c| {
                Observation::Reported(model::condition_of(c.abnormal, &c.message))
            })),
        Err(error) if error.code() == Some(Code::NotFound) => Ok(Observation::Missing {
            how: "ControllerGetVolume answered NotFound",
        }),
        Err(error) => Err(error),
    }
}

/// What an announcement came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Announced {
    /// The event went out (or an earlier one already said it) and the
    /// annotation was written or will be again.
    Written,
    /// A fresh read found the PV gone or no longer this volume: nothing
    /// was announced. The watch may be behind (its API server away, a
    /// re-list under way); this is what keeps a deleted PV from being
    /// announced missing.
    PvGone,
}

/// Writes announcements and node notes as the leader.
#[derive(Clone)]
pub(crate) struct Writer {
    pub(crate) recorder: Recorder,
    pub(crate) leadership: Leadership,
    pub(crate) pvs: Api<PersistentVolume>,
    pub(crate) metrics: Arc<HealthMetrics>,
    pub(crate) driver: Arc<str>,
}

impl Writer {
    /// Whether the PV still is `volume` (bound, this driver's, same
    /// handle and claim), read afresh.
    async fn still_watched(&self, volume: &Watched) -> Result<bool, Error> {
        match self.pvs.get_opt(&volume.pv).await {
            Ok(pv) => Ok(pv.and_then(|pv| model::watched(&pv, &self.driver)).as_ref() == Some(volume)),
            Err(source) => Err(Error::Read {
                pv: volume.pv.clone(),
                source,
            }),
        }
    }

    /// The earlier event about the claim that already says what
    /// `announcement` would (external-health-monitor's before a migration, or
    /// volplane's own), read from the claim's events; `None` when there is
    /// none or they cannot be read (then the announcement is made).
    async fn earlier_announcement(&self, volume: &Watched, announcement: &Announcement) -> Option<model::EarlierEvent> {
        let client = self.pvs.clone().into_client();
        let about = format!(
            "involvedObject.kind=PersistentVolumeClaim,involvedObject.name={}",
            volume.claim
        );
        let earlier = earlier_events(&client, &volume.namespace, &about, None).await?;
        model::already_announced(announcement, &earlier, SystemTime::now()).cloned()
    }

    /// Publishes the event on the PVC (if there is one), then records the
    /// condition on the PV. `Err` only when the event did not go out: a failed
    /// annotation is written again after the next check, never the event.
    pub(crate) async fn announce(
        &self,
        volume: &Watched,
        condition: &Condition,
        announcement: Option<&Announcement>,
    ) -> Result<Announced, Error> {
        if !self.still_watched(volume).await? {
            return Ok(Announced::PvGone);
        }
        let (leadership, pvs) = (&self.leadership, &self.pvs);
        let earlier = match announcement {
            Some(announcement) => self.earlier_announcement(volume, announcement).await,
            None => None,
        };
        if let (Some(announcement), Some(earlier)) = (announcement, &earlier) {
            info!(pv = %volume.pv, namespace = %volume.namespace, claim = %volume.claim, reason = announcement.reason,
              by = %earlier.by, "already announced within the hour; recorded without a second event");
        }
        if let Some(announcement) = announcement.filter(|_| earlier.is_none()) {
            self.publish_announcement(volume, announcement).await?;
        }
        let patch = Patch::Merge(model::annotation_patch(condition));
        match leadership
            .guard(pvs.patch(&volume.pv, &PatchParams::default(), &patch))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                warn!(pv = %volume.pv, %error, "cannot record the announced condition on the PV; retried after the next check")
            }
            // Not leading any more: the next leader judges from the annotation.
            Err(_) if announcement.is_none() => {}
            Err(error) => warn!(pv = %volume.pv, %error, "term ended before the PV annotation was written"),
        }
        Ok(Announced::Written)
    }

    /// The event of an announcement on the volume's PVC, related to its PV.
    async fn publish_announcement(&self, volume: &Watched, announcement: &Announcement) -> Result<(), Error> {
        let (recorder, leadership, metrics) = (&self.recorder, &self.leadership, &self.metrics);
        let type_ = if announcement.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let pv = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolume".into()),
            name: Some(volume.pv.clone()),
            ..ObjectReference::default()
        };
        let event = events::Announcement::new(
            type_,
            announcement.reason,
            "CheckVolumeHealth",
            announcement.note.clone(),
        )
        .related_to(pv);
        match events::publish(recorder, leadership, &event, &volume.claim_reference()).await {
            Ok(Published::Sent) => {
                metrics
                    .events
                    .get_or_create(&vec![("reason", announcement.reason)])
                    .inc();
            }
            Ok(Published::NotLeading) => return Err(Error::NotLeader(NotLeader)),
            Err(source) => {
                return Err(Error::Event {
                    namespace: volume.namespace.clone(),
                    claim: volume.claim.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Publishes a node watcher event on the volume's PVC, then records (or
    /// clears) the failed node in the PV's annotation.
    pub(crate) async fn publish_node_note(&self, volume: &Watched, note: NodeNote) {
        let (recorder, leadership, metrics, pvs) = (&self.recorder, &self.leadership, &self.metrics, &self.pvs);
        let (event, node) = match note {
            NodeNote::Failed { node, note } => {
                (Some((EventType::Warning, model::REASON_NODE_FAILED, note)), Some(node))
            }
            NodeNote::Recovered { note } => (Some((EventType::Normal, model::REASON_NODE_RECOVERED, note)), None),
            NodeNote::Forgotten => (None, None),
        };
        if let Some((type_, reason, note)) = event {
            let event = events::Announcement::new(type_, reason, "WatchNode", note);
            match events::publish(recorder, leadership, &event, &volume.claim_reference()).await {
                Ok(Published::Sent) => {
                    metrics.events.get_or_create(&vec![("reason", reason)]).inc();
                }
                Ok(Published::NotLeading) => return,
                Err(error) => {
                    warn!(%error, reason, pv = %volume.pv, "cannot publish event");
                    return;
                }
            }
        }
        let patch = Patch::Merge(model::node_failure_patch(node.as_deref()));
        if let Ok(Err(error)) = leadership
            .guard(pvs.patch(&volume.pv, &PatchParams::default(), &patch))
            .await
        {
            warn!(%error, pv = %volume.pv, "cannot record the node failure on the PV");
        }
    }
}

/// The events about one object (`about`: a field selector on
/// `involvedObject`; `uid`: only those of this very object) in
/// `namespace`, as [`model::EarlierEvent`]s; `None` when they cannot be
/// read (the caller announces then).
pub(crate) async fn earlier_events(
    client: &kube::Client,
    namespace: &str,
    about: &str,
    uid: Option<&str>,
) -> Option<Vec<model::EarlierEvent>> {
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), namespace);
    let listed = match events.list(&ListParams::default().fields(about)).await {
        Ok(listed) => listed.items,
        Err(error) => {
            debug!(%namespace, %about, %error, "cannot read earlier events; announcing");
            return None;
        }
    };
    let listed = listed
        .into_iter()
        .filter(|e| uid.is_none_or(|uid| e.involved_object.uid.as_deref() == Some(uid)));
    let earlier: Vec<model::EarlierEvent> = listed
        .filter_map(|e| {
            let at = [
                e.series
                    .as_ref()
                    .and_then(|s| s.last_observed_time.as_ref())
                    .map(|t| t.0),
                e.event_time.as_ref().map(|t| t.0),
                e.last_timestamp.as_ref().map(|t| t.0),
                e.first_timestamp.as_ref().map(|t| t.0),
            ]
            .into_iter()
            .flatten()
            .max()?;
            Some(model::EarlierEvent {
                reason: e.reason?,
                message: e.message.unwrap_or_default(),
                at: SystemTime::from(at),
                by: e
                    .reporting_component
                    .filter(|c| !c.is_empty())
                    .or_else(|| e.source.and_then(|s| s.component))
                    .unwrap_or_default(),
            })
        })
        .collect();
    Some(earlier)
}
