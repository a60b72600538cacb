//! Reading what we need out of libvirt XML: a domain's disks and guest agent channel, and the
//! export socket of a running pull-mode backup job.
//!
//! Pure functions over the XML text, tested on literal definitions.

use super::DiskInfo;
use crate::error::{internal, Result};

/// Name of the virtio serial channel the QEMU guest agent listens on.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// `s` made safe inside XML text or a single-quoted attribute.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
}

/// Disks and agent-channel presence from a domain's XML. The system disk is the disk device
/// with `<boot order='1'/>`, else the lowest boot order, else the first disk device.
pub fn parse_domain_xml(xml: &str) -> Result<(Vec<DiskInfo>, bool)> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| internal("libvirt returned domain XML that does not parse").with_source(e))?;
    let devices = doc.descendants().find(|n| n.has_tag_name("devices"));
    let mut disks = Vec::new();
    let mut agent = false;
    if let Some(devices) = devices {
        for n in devices.children().filter(|n| n.is_element()) {
            match n.tag_name().name() {
                "disk" => disks.push(parse_disk(n)),
                "channel" => {
                    let named_agent = n
                        .children()
                        .find(|c| c.has_tag_name("target"))
                        .and_then(|t| t.attribute("name"))
                        == Some(AGENT_CHANNEL);
                    agent |= named_agent;
                }
                _ => {}
            }
        }
    }
    let candidates = disks.iter().enumerate().filter(|(_, d)| d.device == "disk");
    let by_boot = candidates
        .clone()
        .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
        .min()
        .map(|(_, i)| i);
    if let Some(i) = by_boot.or_else(|| candidates.clone().next().map(|(i, _)| i)) {
        disks[i].system_disk = true;
    }
    Ok((disks, agent))
}

fn parse_disk(n: roxmltree::Node) -> DiskInfo {
    let child = |tag: &str| n.children().find(|c| c.has_tag_name(tag));
    let source = child("source");
    let path = source
        .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
        .unwrap_or("")
        .to_string();
    DiskInfo {
        target: child("target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("")
            .to_string(),
        path,
        source_type: n.attribute("type").unwrap_or("file").to_string(),
        format: child("driver")
            .and_then(|d| d.attribute("type"))
            .unwrap_or("")
            .to_string(),
        device: n.attribute("device").unwrap_or("disk").to_string(),
        boot_order: child("boot")
            .and_then(|b| b.attribute("order"))
            .and_then(|o| o.parse().ok()),
        virtual_size: 0,
        system_disk: false,
    }
}

/// The unix socket a pull-mode backup job exports on (`<domainbackup><server
/// transport='unix' socket='...'/>`), from `virDomainBackupGetXMLDesc`; None for a push-mode
/// job or a TCP export.
pub fn backup_socket(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let server = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("server"))?;
    (server.attribute("transport") == Some("unix"))
        .then(|| server.attribute("socket").map(str::to_string))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'><name>t</name><devices>
      <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso'/><target dev='sda' bus='sata'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/root'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    </devices></domain>"#;

    #[test]
    fn disks_and_agent() {
        let (disks, agent) = parse_domain_xml(XML).unwrap();
        assert!(agent);
        assert_eq!(disks.len(), 3);
        assert_eq!(disks[0].device, "cdrom");
        let sys: Vec<_> = disks.iter().filter(|d| d.system_disk).collect();
        assert_eq!(sys.len(), 1);
        assert_eq!(sys[0].target, "vda");
        assert_eq!(sys[0].path, "/dev/vg/root");
        assert_eq!(sys[0].source_type, "block");
        assert_eq!(disks[1].format, "qcow2");
    }

    #[test]
    fn first_disk_without_boot_order() {
        let xml = XML.replace("<boot order='1'/>", "");
        let (disks, _) = parse_domain_xml(&xml).unwrap();
        assert!(disks[1].system_disk);
    }

    #[test]
    fn no_disks_no_agent() {
        let (disks, agent) =
            parse_domain_xml("<domain><devices><console type='pty'/></devices></domain>").unwrap();
        assert!(disks.is_empty());
        assert!(!agent);
        assert!(parse_domain_xml("<domain").is_err());
    }

    #[test]
    fn backup_socket_of_a_pull_job() {
        let x = "<domainbackup mode='pull'><server transport='unix' socket='/run/imaged/backup-op1/nbd.sock'/>\
                 <disks><disk name='vda' backup='yes'/></disks></domainbackup>";
        assert_eq!(
            backup_socket(x).as_deref(),
            Some("/run/imaged/backup-op1/nbd.sock")
        );
        assert_eq!(
            backup_socket("<domainbackup mode='pull'><server transport='tcp' name='h' port='1'/></domainbackup>"),
            None
        );
        assert_eq!(
            backup_socket("<domainbackup mode='push'><disks/></domainbackup>"),
            None
        );
        assert_eq!(backup_socket("not xml"), None);
    }
}
