//! libvirt checkpoints: the persistent dirty bitmap that lets the next backup job export only
//! what changed. The `virt` crate has no checkpoint API, so this calls libvirt's C functions
//! (`virDomainCheckpoint*`) through `virt::sys`, each pointer owned by a [`Checkpoint`] that
//! frees it.
//!
//! A checkpoint has two halves: the bitmap, which QEMU keeps in the disk's qcow2 image, and
//! libvirt's record of it. imaged keeps the record only for the length of a capture: after
//! the image is committed, the new checkpoint's XML is saved and its record deleted
//! (`METADATA_ONLY`, the bitmap stays); the next capture defines it again from that XML
//! (`CREATE_REDEFINE`) just before its job begins. So a domain at rest has no checkpoint
//! record and a plain `virsh undefine` works (libvirt refuses to undefine a shut-off domain
//! that has one).

use std::ffi::{CStr, CString};

use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::libvirt_err;
use crate::error::{invalid, Result};

/// An owned `virDomainCheckpointPtr`, freed on drop.
struct Checkpoint(virt::sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: the pointer came non-null from libvirt, is owned by this value alone, and
        // is freed once here.
        unsafe {
            virt::sys::virDomainCheckpointFree(self.0);
        }
    }
}

/// The XML that creates checkpoint `name` on disk `disk` only (a bitmap named like it).
pub fn create_xml(name: &str, disk: &str) -> String {
    format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n    <disk name='{}' checkpoint='bitmap'/>\n  </disks>\n</domaincheckpoint>\n",
        crate::hypervisor::xml::escape(name),
        crate::hypervisor::xml::escape(disk)
    )
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| invalid(format!("{what} holds a NUL byte")))
}

/// Looks checkpoint `checkpoint` up; None when the domain has no record of it.
fn lookup(dom: &Domain, name: &str, checkpoint: &str) -> Result<Option<Checkpoint>> {
    let c = cstring("the checkpoint name", checkpoint)?;
    // SAFETY: `dom` is live for the call and `c` is NUL-terminated and outlives it; a non-null
    // result is a new reference we own (freed by `Checkpoint`'s drop).
    let p = unsafe { virt::sys::virDomainCheckpointLookupByName(dom.as_ptr(), c.as_ptr(), 0) };
    if !p.is_null() {
        return Ok(Some(Checkpoint(p)));
    }
    let e = virt::error::Error::last_error();
    if e.code() == Enum::Known(ErrorNumber::NoDomainCheckpoint) {
        return Ok(None);
    }
    Err(libvirt_err(
        format!("looking up checkpoint {checkpoint} of domain {name}"),
        e,
    ))
}

/// Defines a checkpoint again from the XML it was saved as (its bitmap must still be in the
/// image for a job to use it; libvirt checks that when the job begins). Why not, in words,
/// for the caller's note.
pub(super) fn redefine(dom: &Domain, xml: &str) -> std::result::Result<(), String> {
    let Ok(x) = CString::new(xml) else {
        return Err("its saved XML holds a NUL byte".into());
    };
    // SAFETY: `dom` is live for the call and `x` is NUL-terminated and outlives it; the
    // returned reference, when non-null, is ours and freed by `Checkpoint`'s drop.
    let p = unsafe {
        virt::sys::virDomainCheckpointCreateXML(
            dom.as_ptr(),
            x.as_ptr(),
            virt::sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
        )
    };
    if p.is_null() {
        return Err(virt::error::Error::last_error().message().to_string());
    }
    drop(Checkpoint(p));
    Ok(())
}

/// The XML of checkpoint `checkpoint` (with the domain definition it was made on, which a
/// redefinition needs).
pub(super) fn xml(dom: &Domain, name: &str, checkpoint: &str) -> Result<String> {
    let what = || format!("reading checkpoint {checkpoint} of domain {name}");
    let cp = lookup(dom, name, checkpoint)?.ok_or_else(|| {
        crate::error::not_found(format!("domain {name} has no checkpoint {checkpoint}"))
    })?;
    // SAFETY: `cp.0` is live; a non-null result is a malloc'd NUL-terminated string we own:
    // copied, then freed once.
    let s = unsafe {
        let p = virt::sys::virDomainCheckpointGetXMLDesc(cp.0, 0);
        if p.is_null() {
            None
        } else {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            Some(s)
        }
    };
    s.ok_or_else(|| libvirt_err(what(), virt::error::Error::last_error()))
}

/// Deletes checkpoint `checkpoint`: its record only with `keep_bitmap`, else its bitmap too
/// (a domain that does not run, or whose image lacks the bitmap, loses the record only). Ok
/// when there is no such checkpoint.
pub(super) fn delete(dom: &Domain, name: &str, checkpoint: &str, keep_bitmap: bool) -> Result<()> {
    let Some(cp) = lookup(dom, name, checkpoint)? else {
        return Ok(());
    };
    let metadata_only = virt::sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY;
    let running = dom.is_active().unwrap_or(false);
    let flags = if keep_bitmap || !running {
        metadata_only
    } else {
        0
    };
    // SAFETY: `cp.0` is live for the call.
    if unsafe { virt::sys::virDomainCheckpointDelete(cp.0, flags) } == 0 {
        return Ok(());
    }
    let e = virt::error::Error::last_error();
    if flags != metadata_only {
        // The bitmap is not there (the image was replaced, the bitmap removed): the record
        // is all there is to delete.
        tracing::info!(domain = name, checkpoint, error = %e, "checkpoint bitmap not removed; deleting its record only");
        // SAFETY: as above.
        if unsafe { virt::sys::virDomainCheckpointDelete(cp.0, metadata_only) } == 0 {
            return Ok(());
        }
        let e = virt::error::Error::last_error();
        return Err(libvirt_err(
            format!("deleting checkpoint {checkpoint} of domain {name}"),
            e,
        ));
    }
    Err(libvirt_err(
        format!("deleting checkpoint {checkpoint} of domain {name}"),
        e,
    ))
}

/// The names of the domain's checkpoint records.
pub(super) fn list(dom: &Domain, name: &str) -> Result<Vec<String>> {
    let mut arr: *mut virt::sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: `dom` is live; on success libvirt stores a malloc'd array of `n` checkpoint
    // references in `arr`, each ours to free, and the array ours to free.
    let n = unsafe { virt::sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut arr, 0) };
    if n < 0 {
        return Err(libvirt_err(
            format!("listing the checkpoints of domain {name}"),
            virt::error::Error::last_error(),
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `i < n`, so the element is one of the references libvirt returned; taking
        // it into a `Checkpoint` frees it exactly once. The name is borrowed from the
        // checkpoint and copied before it is freed.
        let cp = Checkpoint(unsafe { *arr.add(i) });
        let nm = unsafe { virt::sys::virDomainCheckpointGetName(cp.0) };
        if !nm.is_null() {
            // SAFETY: a non-null name is a NUL-terminated string alive as long as `cp`.
            out.push(unsafe { CStr::from_ptr(nm) }.to_string_lossy().into_owned());
        }
    }
    if !arr.is_null() {
        // SAFETY: the array itself was malloc'd by libvirt; its elements are freed above.
        unsafe { libc::free(arr.cast()) };
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_covers_the_exported_disk_only() {
        let x = create_xml("imaged-vda-op1", "vda");
        assert!(x.contains("<name>imaged-vda-op1</name>"), "{x}");
        assert!(x.contains("<disk name='vda' checkpoint='bitmap'/>"), "{x}");
        assert_eq!(x.matches("<disk ").count(), 1, "{x}");
    }
}
