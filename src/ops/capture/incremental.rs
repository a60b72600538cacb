//! Incremental live captures: the checkpoint a live capture makes, and the one it counts from.
//!
//! A live capture into a repository (local, or an imagerepo: the sinks that store chunks) of a
//! qcow2 disk asks its backup job for a checkpoint, `imaged-<disk>-<operation>`: QEMU starts a
//! persistent dirty bitmap in the image at the job's point in time, the instant the image is
//! taken. Once the image is committed, imaged saves, in
//! `<state_dir>/checkpoints/<domain uuid>-<disk>.json`, the checkpoint's XML and the image's
//! chunk list, and deletes libvirt's record of the checkpoint (the bitmap stays in the image).
//! The next live capture of that disk defines the checkpoint again from the saved XML, begins
//! its job incremental from it (QEMU exports the bitmap as the NBD meta context
//! `qemu:dirty-bitmap:backup-<disk>`), reads only the chunks a written block touches and takes
//! every other chunk from the saved list. Then the old checkpoint is deleted with its bitmap,
//! and the new one saved in its place: one bitmap per disk, and no checkpoint record at rest,
//! so `virsh undefine` of the shut-off domain works as before (libvirt refuses to undefine a
//! shut-off domain that has checkpoint records).
//!
//! The state is keyed by the domain's UUID, so a domain defined anew under the same name does
//! not inherit it. A capture that fails deletes its new checkpoint (bitmap too) and keeps the old
//! one. Every record the job defines is a duty in the capture's journal entry until it is
//! deleted: a deletion that fails is retried by the janitor, and a daemon that died mid-capture
//! deletes them at its next start. A record that still escapes (the journal lives under `/run`,
//! so a host reboot loses it) is removed by the next capture of that disk.
//! Whenever an incremental read cannot be had (the first capture, a bitmap lost because QEMU
//! was killed, a disk replaced or resized, a raw disk, a store that lost the base's chunks),
//! the whole disk is read and the operation's [`ReadReport`] says why. Writes that bypass
//! QEMU (a `dd` into the image file while the domain is off) cannot be seen by any bitmap:
//! `[capture] incremental = false` turns the feature off.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::super::journal::{Entry, Journal};
use super::super::{Controller, OpEntry};
use super::Plan;
use crate::capture::{Base, Captured};
use crate::error::{Error, Result};
use crate::hypervisor::{BackupBegun, CheckpointPlan, SavedCheckpoint};
use crate::ops::operation::ReadReport;
use crate::repo::{DataChunk, CHUNK_SIZE};

/// The version of the saved state's format.
const FORMAT_VERSION: u32 = 1;

/// What is kept between two live captures of a disk.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    format_version: u32,
    domain_uuid: String,
    /// For people reading the file.
    domain: String,
    disk: String,
    checkpoint: SavedCheckpoint,
    virtual_size: u64,
    chunk_size: u64,
    /// Where the image taken at the checkpoint went.
    image: String,
    created_at: i64,
    /// The image's data chunks, ascending by index.
    #[serde(with = "crate::repo::manifest::chunk_list")]
    chunks: Vec<DataChunk>,
}

/// What a live capture asks of its backup job, and what it builds on.
#[derive(Default)]
pub(super) struct Prepared {
    pub checkpoints: CheckpointPlan,
    pub base: Option<Base>,
    /// Why no checkpoint is asked, or why the saved one is not used, when either could be.
    pub note: String,
}

impl Controller {
    fn saved_path(&self, plan: &Plan) -> PathBuf {
        self.inner
            .cfg
            .daemon
            .state_dir
            .join("checkpoints")
            .join(format!("{}-{}.json", plan.info.uuid, plan.target))
    }

    fn load_saved(&self, plan: &Plan) -> std::result::Result<Option<Saved>, String> {
        let path = self.saved_path(plan);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{} cannot be read: {e}", path.display())),
        };
        let saved: Saved = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a saved checkpoint: {e}", path.display()))?;
        if saved.format_version != FORMAT_VERSION
            || saved.domain_uuid != plan.info.uuid
            || saved.disk != plan.target
            || saved.chunk_size != CHUNK_SIZE
        {
            return Err(format!(
                "{} is of another version, domain, disk or chunk size",
                path.display()
            ));
        }
        Ok(Some(saved))
    }

    /// The checkpoints a live capture into `chunked` (a repository) or a stream asks of its
    /// job, and the base it reads on. Removes records a dead capture left on the domain.
    pub(super) async fn prepare_checkpoints(
        &self,
        op: &OpEntry,
        plan: &Plan,
        chunked: bool,
    ) -> Prepared {
        if !self.inner.cfg.capture.incremental || !chunked {
            return Prepared::default();
        }
        let disk = plan.target.clone();
        let format = plan
            .info
            .disks
            .iter()
            .find(|d| d.target == disk)
            .map(|d| d.format.clone())
            .unwrap_or_default();
        if format != "qcow2" {
            return Prepared {
                note: format!(
                    "disk {disk} is {}: only a qcow2 image holds the dirty bitmap an incremental capture needs",
                    if format.is_empty() { "of no named format" } else { &format }
                ),
                ..Default::default()
            };
        }
        let (saved, mut note) = match self.load_saved(plan) {
            Ok(s) => (s, String::new()),
            Err(why) => {
                tracing::warn!(op = %op.id, domain = %plan.info.name, disk, "{why}; the whole disk is read");
                (None, format!("{why}, so the whole disk is read"))
            }
        };
        if saved.is_none() && note.is_empty() {
            note = format!("no earlier checkpoint of disk {disk}: the whole disk is read");
        }
        // Records left by a capture that died: the saved checkpoint's record goes (its bitmap
        // stays, it is defined again below); any other of ours goes with its bitmap.
        let keep = saved.as_ref().map(|s| s.checkpoint.name.clone());
        let prefix = format!("imaged-{disk}-");
        let d = plan.info.name.clone();
        match self.hv(move |hv| hv.checkpoints(&d)).await {
            Ok(names) => {
                for c in names.into_iter().filter(|c| c.starts_with(&prefix)) {
                    let keep_bitmap = keep.as_deref() == Some(c.as_str());
                    let (d, cc) = (plan.info.name.clone(), c.clone());
                    match self
                        .hv(move |hv| hv.delete_checkpoint(&d, &cc, keep_bitmap))
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(op = %op.id, domain = %plan.info.name, checkpoint = %c, "removed a checkpoint record an earlier capture left")
                        }
                        Err(e) => {
                            tracing::warn!(op = %op.id, domain = %plan.info.name, checkpoint = %c, error = %e.chain(), "could not remove a checkpoint an earlier capture left")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(op = %op.id, domain = %plan.info.name, error = %e.chain(), "cannot list the domain's checkpoints")
            }
        }
        let base = saved.as_ref().map(|s| Base {
            virtual_size: s.virtual_size,
            chunks: s.chunks.clone(),
        });
        Prepared {
            checkpoints: CheckpointPlan {
                create: Some(format!("{prefix}{}", op.id)),
                since: saved.map(|s| s.checkpoint),
            },
            base,
            note,
        }
    }

    /// After the job ended: on success, saves the new checkpoint (with what `captured`
    /// stored, which the next capture builds on) and leaves one bitmap on the disk; on failure,
    /// drops the new checkpoint and keeps the old. Failures here are logged, never the
    /// capture's: the worst they cost is a full read next time.
    ///
    /// The journal `entry` names every record the job defined and how it is to go (its
    /// bitmap kept or not), updated as that changes here; a record deleted leaves the entry,
    /// one that could not be stays for the janitor (or, after a crash, the daemon's recovery),
    /// so no record outlives the capture and `virsh undefine` keeps working.
    pub(super) async fn settle_checkpoints(
        &self,
        op: &OpEntry,
        plan: &Plan,
        begun: &BackupBegun,
        captured: Option<&Captured>,
        journal: &Journal,
        entry: &mut Entry,
    ) {
        // Records the job's begin dealt with itself (not made, or deleted when it fell back).
        let listed = entry.checkpoints.len();
        entry.checkpoints.retain(|c| {
            Some(&c.name) == begun.checkpoint.as_ref() || Some(&c.name) == begun.since.as_ref()
        });
        if entry.checkpoints.len() != listed {
            journal.update(entry);
        }
        let Some(new) = begun.checkpoint.clone() else {
            // No checkpoint was made: the old one (if any) stays the base, its record goes.
            if let Some(old) = &begun.since {
                self.drop_record(op, plan, journal, entry, old, true).await;
            }
            return;
        };
        let Some(captured) = captured else {
            self.drop_record(op, plan, journal, entry, &new, false)
                .await;
            if let Some(old) = &begun.since {
                self.drop_record(op, plan, journal, entry, old, true).await;
            }
            return;
        };
        // The old checkpoint goes first (bitmap and record), so the new one is read without a
        // parent that will not exist when it is defined again.
        if let Some(old) = begun.since.as_ref().filter(|o| **o != new) {
            self.drop_record(op, plan, journal, entry, old, false).await;
        }
        match self.save_checkpoint(op, plan, &new, captured).await {
            Ok(()) => {
                // Saved: from now on its bitmap is the next capture's base.
                self.drop_record(op, plan, journal, entry, &new, true).await;
                tracing::info!(op = %op.id, domain = %plan.info.name, disk = %plan.target, checkpoint = %new,
                    "checkpoint saved: the next capture of this disk reads only what changes");
            }
            Err(e) => {
                tracing::warn!(op = %op.id, domain = %plan.info.name, checkpoint = %new, error = %e.chain(),
                    "could not save the checkpoint; the next capture reads the whole disk");
                self.drop_record(op, plan, journal, entry, &new, false)
                    .await;
            }
        }
    }

    /// Deletes checkpoint record `cp` (its bitmap kept or not). The journal entry says so
    /// first, so that a daemon dying here deletes it the same way at its next start; the duty
    /// leaves the entry once the record is gone, and stays for the janitor when it is not.
    async fn drop_record(
        &self,
        op: &OpEntry,
        plan: &Plan,
        journal: &Journal,
        entry: &mut Entry,
        cp: &str,
        keep_bitmap: bool,
    ) {
        if entry.checkpoint_duty(cp, keep_bitmap) {
            journal.update(entry);
        }
        let (d, c) = (plan.info.name.clone(), cp.to_string());
        match self
            .hv(move |hv| hv.delete_checkpoint(&d, &c, keep_bitmap))
            .await
        {
            Ok(()) => {
                entry.checkpoints.retain(|c| c.name != cp);
                journal.update(entry);
            }
            Err(e) => {
                tracing::warn!(op = %op.id, domain = %plan.info.name, checkpoint = %cp, error = %e.chain(),
                    "could not delete a checkpoint record; imaged keeps trying in the background");
            }
        }
    }

    async fn save_checkpoint(
        &self,
        op: &OpEntry,
        plan: &Plan,
        checkpoint: &str,
        captured: &Captured,
    ) -> Result<()> {
        let (d, c) = (plan.info.name.clone(), checkpoint.to_string());
        let xml = without_parent(&self.hv(move |hv| hv.checkpoint_xml(&d, &c)).await?);
        let saved = Saved {
            format_version: FORMAT_VERSION,
            domain_uuid: plan.info.uuid.clone(),
            domain: plan.info.name.clone(),
            disk: plan.target.clone(),
            checkpoint: SavedCheckpoint {
                name: checkpoint.to_string(),
                xml,
            },
            virtual_size: captured.virtual_size,
            chunk_size: CHUNK_SIZE,
            image: op.image_name.clone(),
            created_at: crate::util::now_unix(),
            chunks: captured.chunks.clone(),
        };
        let path = self.saved_path(plan);
        super::super::blocking(move || {
            let json = serde_json::to_vec(&saved).map_err(|e| {
                Error::new(
                    crate::error::ErrorKind::Internal,
                    "encoding a saved checkpoint",
                )
                .with_source(e)
            })?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            crate::util::write_atomic(&path, &json)
        })
        .await
    }
}

/// `xml` without its `<parent>` element: libvirt refuses to define a checkpoint again whose
/// parent it has no record of, and imaged keeps no other.
fn without_parent(xml: &str) -> String {
    match (xml.find("<parent>"), xml.find("</parent>")) {
        (Some(a), Some(b)) if b > a => {
            let mut s = String::with_capacity(xml.len());
            s.push_str(xml[..a].trim_end_matches([' ', '\t']));
            s.push_str(xml[b + "</parent>".len()..].trim_start_matches(['\n']));
            s
        }
        _ => xml.to_string(),
    }
}

/// The operation's report of how the disk was read: from `captured` once the read is done,
/// else from what the job was begun for.
pub(super) fn report(
    prepared_note: &str,
    begun: &BackupBegun,
    captured: Option<&Captured>,
) -> ReadReport {
    let mut notes: Vec<String> = Vec::new();
    if !prepared_note.is_empty() && begun.since.is_none() {
        notes.push(prepared_note.to_string());
    }
    notes.extend(begun.notes.iter().cloned());
    if let Some(r) = captured.and_then(|c| c.full_reason.clone()) {
        notes.push(format!("{r}, so the whole disk was read"));
    }
    let changed = captured.and_then(|c| c.changed_bytes);
    // Before the read ends (or when it failed): what the job was begun for.
    let incremental = match captured {
        Some(_) => changed.is_some(),
        None => begun.since.is_some(),
    };
    ReadReport {
        incremental,
        since_checkpoint: if incremental {
            begun.since.clone().unwrap_or_default()
        } else {
            String::new()
        },
        changed_bytes: changed.unwrap_or(0),
        checkpoint: begun.checkpoint.clone().unwrap_or_default(),
        note: notes.join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_checkpoint_has_no_parent() {
        let x = "<domaincheckpoint>\n  <name>imaged-vda-2</name>\n  <parent>\n    <name>imaged-vda-1</name>\n  </parent>\n  <creationTime>1</creationTime>\n</domaincheckpoint>\n";
        let y = without_parent(x);
        assert_eq!(
            y,
            "<domaincheckpoint>\n  <name>imaged-vda-2</name>\n  <creationTime>1</creationTime>\n</domaincheckpoint>\n"
        );
        assert_eq!(without_parent(&y), y);
    }

    #[test]
    fn the_report_says_why_the_whole_disk_was_read() {
        let begun = BackupBegun {
            checkpoint: Some("imaged-vda-op2".into()),
            since: None,
            notes: vec!["the changes since checkpoint imaged-vda-op1 of disk vda cannot be told (checkpoint inconsistent), so the whole disk is read".into()],
        };
        let r = report("", &begun, None);
        assert!(!r.incremental);
        assert_eq!(r.checkpoint, "imaged-vda-op2");
        assert!(r.note.contains("inconsistent"), "{r:?}");
        let first = report(
            "no earlier checkpoint of disk vda: the whole disk is read",
            &BackupBegun {
                checkpoint: Some("c".into()),
                ..Default::default()
            },
            None,
        );
        assert!(first.note.starts_with("no earlier checkpoint"), "{first:?}");
    }
}
