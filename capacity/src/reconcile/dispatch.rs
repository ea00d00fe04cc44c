//! The dispatcher: due items become GetCapacity questions (shared by
//! items that ask the same), answers become writes, failures back off.

use super::*;

impl LoopState {
    pub(super) fn has_free_worker(&self) -> bool {
        self.busy < self.config.workers.max(1)
    }

    /// Hands due items to free workers: an item joins the question in
    /// flight for its segment and parameters, or asks a new one.
    pub(super) fn dispatch(&mut self) {
        if !self.may_decide() || !self.leading {
            return;
        }
        let now = Instant::now();
        while self.has_free_worker() {
            let Some(item) = self.queue.pop_due(now) else {
                break;
            };
            if self.awaits_watch(&item, now) {
                let until = self
                    .published
                    .unseen
                    .get(&item)
                    .map_or(now, |unseen| unseen.at + UNSEEN_LIMIT);
                self.queue.finish(&item);
                self.queue.schedule(item.clone(), until);
                self.published.deferred.insert(item);
                continue;
            }
            if self.publish_from_last(&item) {
                continue;
            }
            let Some(parameters) = self
                .classes
                .get(&item.class)
                .filter(|_| self.segments.contains(&item.segment))
                .cloned()
            else {
                self.queue.finish(&item);
                continue;
            };
            let query = Query {
                segment: item.segment.clone(),
                parameters,
            };
            match self.asking.entry(query) {
                hash_map::Entry::Occupied(mut waiting) => waiting.get_mut().push(item),
                hash_map::Entry::Vacant(slot) => {
                    let query = slot.key().clone();
                    slot.insert(vec![item]);
                    self.ask(query);
                }
            }
        }
    }

    /// Asks the driver `query`.
    pub(super) fn ask(&mut self, query: Query) {
        self.busy += 1;
        let csi = self.csi.clone();
        let metrics = self.metrics.clone();
        let asked = self.in_flight.now();
        let request = CapacityQuery {
            parameters: (*query.parameters).clone(),
            topology: self.config.send_topology.then(|| query.segment.labels().clone()),
        };
        self.tasks.push(
            async move {
                let started = Instant::now();
                let report = csi.get_capacity(&request).await;
                let code = match &report {
                    Ok(_) => "OK",
                    Err(error) => error.label(),
                };
                metrics
                    .get_capacity_seconds
                    .get_or_create(&vec![("grpc_code", code.to_string())])
                    .observe(started.elapsed().as_secs_f64());
                Done::Answered(query, asked, report)
            }
            .boxed(),
        );
    }

    pub(super) fn finished(&mut self, done: Done) {
        match done {
            Done::Answered(query, asked, report) => {
                self.busy -= 1;
                let waiting = self.asking.remove(&query).unwrap_or_default();
                for item in waiting {
                    match &report {
                        Ok(report) => {
                            let fell = self.remember_answer(&item, *report, asked);
                            self.answered(item, *report, asked, fell);
                        }
                        Err(error) => self.refreshed(item, Err(Error::Csi(error.clone()))),
                    }
                }
            }
            Done::Wrote(item, value, result) => {
                self.busy -= 1;
                self.refreshed(item, result.map(|written| (Some(written), value)));
            }
            Done::Deleted(name, result) => {
                self.published.deleting.remove(&name);
                match result {
                    Ok(()) | Err(Error::NotLeader(_)) => {}
                    Err(error) => {
                        warn!(%name, %error, "cannot delete obsolete CSIStorageCapacity; will retry after the next re-list");
                    }
                }
            }
        }
    }

    /// The driver answered for `item` (asked at `asked`; its value `fell`
    /// since its previous answer): its object is created or patched when
    /// the value (or anything else volplane owns in it) changed.
    pub(super) fn answered(&mut self, item: WorkItem, report: CapacityReport, asked: Moment, fell: i64) {
        let publication = self.published_value(&item, report, asked, fell);
        let value = publication.value;
        if !self.desired(&item) {
            self.queue.finish(&item);
            return;
        }
        if !self.may_decide() {
            // Asked before a re-list began: decided on the complete view.
            self.queue.finish(&item);
            self.queue.schedule(item, Instant::now());
            return;
        }
        if !self.leading {
            self.refreshed(item, Err(Error::NotLeader(volplane_runtime::NotLeader)));
            return;
        }
        match self.write_for(&item, publication) {
            Ok(write) => {
                self.answers.wrote(&item);
                self.start_write(item, value, write);
            }
            Err(due) => {
                self.refreshed(item.clone(), Ok((None, value)));
                if let Some(due) = due {
                    self.queue.schedule(item, due);
                }
            }
        }
    }

    /// The write that makes `item`'s object publish `publication`, or none
    /// (with when a change that waits is due).
    fn write_for(&mut self, item: &WorkItem, publication: Publication) -> std::result::Result<Write, Option<Instant>> {
        let known = self.published.objects.get(item).and_then(|name| {
            let stored = self.published.store.get(name)?;
            Some((name.clone(), stored.object.clone()))
        });
        let incumbent = self
            .adoption
            .incumbent_items
            .get(item)
            .and_then(|name| Some((name.clone(), self.adoption.incumbents.get(name)?)));
        match (known, incumbent) {
            // csi-provisioner's object stands for the item: taken over in
            // place once the gate allows, never duplicated before.
            // Before the gate allows, its value alone is the driver's (see `values`).
            (None, Some((name, theirs))) => {
                let adopt = self.adoption.gate.as_ref().is_some_and(|gate| gate.may_adopt(item));
                if !adopt {
                    if self.adoption.values.awaits_watch(&name) {
                        return Err(None);
                    }
                    let patch = model::value_patch(&theirs.object, publication.value).ok_or(None)?;
                    debug!(%item, %name, "the driver's value into csi-provisioner's CSIStorageCapacity");
                    return Ok(Write::Value(name, patch));
                }
                let patch = model::update_patch(&theirs.object, publication, &self.config.identity).ok_or(None)?;
                info!(%item, %name, "adopting csi-provisioner's CSIStorageCapacity");
                self.adoption.adopting.insert(item.clone(), name.clone());
                Ok(Write::Patch(name, patch))
            }
            (None, None) => Ok(Write::Create(Box::new(model::new_object(
                item,
                publication,
                &self.config.identity,
            )))),
            (Some((name, known)), _) => {
                let (publication, due) = self.reservation_due(item, &known, publication);
                let patch = model::update_patch(&known, publication, &self.config.identity).ok_or(due)?;
                Ok(Write::Patch(name, patch))
            }
        }
    }

    /// Runs `write` for `item` as a task.
    fn start_write(&mut self, item: WorkItem, value: PublishedCapacity, write: Write) {
        self.busy += 1;
        if let Write::Value(name, _) = &write {
            self.adoption.values.started(&item, name);
        }
        let writer = Writer {
            client: self.client.clone(),
            url: self.api.resource_url().to_string(),
            leadership: self.leadership.clone(),
            metrics: self.metrics.clone(),
        };
        self.tasks.push(
            async move {
                let result = writer.write(&item, write).await;
                Done::Wrote(item, value, result)
            }
            .boxed(),
        );
    }

    /// The item's next regular poll: all classes of a segment at once, in
    /// one of [`POLL_SLOTS`] slots of the interval.
    /// While a released volume's deletion is expected (per-node mode),
    /// every [`answers::FAST_POLL`] instead.
    pub(super) fn next_poll(&self, item: &WorkItem) -> Instant {
        if self.answers.fast(Instant::now()) {
            return Instant::now() + answers::FAST_POLL;
        }
        let interval = self.config.poll_interval;
        let slot = interval / POLL_SLOTS;
        let phase = phase::phase(&item.segment.to_string(), interval);
        let phase = if slot.is_zero() {
            phase
        } else {
            slot * u32::try_from(phase.as_nanos() / slot.as_nanos()).unwrap_or(0)
        };
        work_queue::next_poll(Instant::now(), self.start, interval, phase)
    }

    /// A run of `item` ended: with what was written (if anything) and the
    /// value published, or an error.
    pub(super) fn refreshed(&mut self, item: WorkItem, result: Result<(Option<Written>, PublishedCapacity)>) {
        self.queue.finish(&item);
        if let Some(name) = self.adoption.adopting.remove(&item) {
            self.adopted(&item, &name, result.as_ref().map(|_| ()));
        }
        let result = self.value_written(&item, result);
        let desired = self.desired(&item);
        let next = match result {
            Ok((written, value)) => {
                self.queue.succeeded(&item);
                self.last_warning.remove(&item);
                self.note_oversized(&item, value);
                self.answers.published(&item, value);
                if let Some(written) = written {
                    self.wrote(&item, written, desired);
                }
                self.next_poll(&item)
            }
            Err(Error::NotLeader(_)) => {
                // Cut off by a lost lease: done again once leading.
                debug!(%item, "refresh abandoned: not leading");
                Instant::now()
            }
            Err(error) if error.is_not_found() => {
                // Deleted behind our back between the watch event and the
                // write: the watch brings the deletion, which re-creates at
                // once; the next poll is the fallback.
                debug!(%item, "object gone before the write; waiting for the watch");
                self.next_poll(&item)
            }
            Err(error) => self.refresh_failed(&item, &error),
        };
        if desired {
            self.queue.schedule(item, next);
        }
    }

    /// A refresh wrote `written`: the watch will bring it back; until then
    /// it is awaited (or it is deleted at once when nobody needs it).
    pub(super) fn wrote(&mut self, item: &WorkItem, written: Written, desired: bool) {
        let Written { name, version } = written;
        match self.published.objects.get(item) {
            _ if !desired => self.delete(&name),
            Some(known) if *known != name => self.delete(&name),
            // The watch was quicker than the response.
            Some(_)
                if self
                    .published
                    .store
                    .get(&name)
                    .is_some_and(|s| s.object.version == version) => {}
            _ => {
                let unseen = Unseen {
                    name,
                    version,
                    at: Instant::now(),
                };
                self.published.unseen.insert(item.clone(), unseen);
            }
        }
    }

    /// Logs and counts a failed refresh and says when to retry: a permanent
    /// error waits for the next poll, others back off.
    pub(super) fn refresh_failed(&mut self, item: &WorkItem, error: &Error) -> Instant {
        let failures = self.queue.failed(item);
        let retry_at = if error.is_permanent() {
            self.next_poll(item)
        } else {
            Instant::now() + self.config.backoff.delay(failures)
        };
        warn!(%item, error = %error, failures, permanent = error.is_permanent(),
              retry_in = ?retry_at.saturating_duration_since(Instant::now()),
              "capacity refresh failed; the published value stays");
        if error.is_announced() {
            self.warn_event(item, error);
        }
        retry_at
    }

    /// A Warning event on the owner, at most once per item per poll
    /// interval, and per minute when polls are more frequent.
    pub(super) fn warn_event(&mut self, item: &WorkItem, error: &Error) {
        let Some(target) = self.config.event_target.clone() else {
            return;
        };
        let now = Instant::now();
        let quiet = self.config.poll_interval.max(WARNING_INTERVAL);
        if self
            .last_warning
            .get(item)
            .is_some_and(|last| now.duration_since(*last) < quiet)
        {
            return;
        }
        self.last_warning.insert(item.clone(), now);
        let reason = match error {
            Error::Write { .. } => "CapacityRejected",
            _ => "GetCapacityFailed",
        };
        let announcement = Announcement::warning(reason, "GetCapacity", model::refresh_failure_note(item, error));
        events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
    }

    /// Says once per item that its maximum volume size exceeds its capacity
    /// (published as reported; the scheduler trusts the maximum).
    pub(super) fn note_oversized(&mut self, item: &WorkItem, value: PublishedCapacity) {
        let oversized = value
            .maximum_volume_size
            .is_some_and(|maximum| maximum > value.capacity);
        if !oversized {
            self.oversized.remove(item);
        } else if self.oversized.insert(item.clone()) {
            info!(%item, capacity = value.capacity, maximum_volume_size = ?value.maximum_volume_size,
                  "the driver reports a maximum volume size above the available capacity; published as reported");
        }
    }
}

/// A write for one item.
pub(super) enum Write {
    Create(Box<CSIStorageCapacity>),
    Patch(String, Value),
    /// The value alone, into csi-provisioner's object (it stays theirs).
    Value(String, Value),
}

/// Writes objects, reading back only what the loop needs of the answer.
pub(super) struct Writer {
    pub(super) client: kube::Client,
    pub(super) url: String,
    pub(super) leadership: Leadership,
    pub(super) metrics: Arc<CapacityMetrics>,
}

impl Writer {
    pub(super) async fn write(&self, item: &WorkItem, write: Write) -> Result<Written> {
        let request = kube::core::Request::new(&self.url);
        let (verb, built) = match &write {
            Write::Create(object) => (
                "create",
                serde_json::to_vec(object)
                    .map_err(kube::core::request::Error::SerializeBody)
                    .and_then(|body| request.create(&PostParams::default(), body)),
            ),
            Write::Patch(name, patch) | Write::Value(name, patch) => (
                "patch",
                request.patch(name, &PatchParams::default(), &Patch::Merge(patch)),
            ),
        };
        let built = built.map_err(|source| Error::Write {
            verb,
            source: kube::Error::BuildRequest(source),
        })?;
        let written: CapacityObject = self
            .leadership
            .guard(self.client.request(built))
            .await?
            .map_err(|source| Error::Write { verb, source })?;
        self.metrics.wrote(verb);
        let name = written.metadata.name.unwrap_or_default();
        debug!(%item, %name, verb, "wrote CSIStorageCapacity");
        Ok(Written {
            name,
            version: written.metadata.resource_version,
        })
    }
}
