//! The tables the real `imagectl` prints (`domains`, `images`, `ops`) against a real daemon,
//! with a real libvirt domain (defined, not started) and real imports whose names are longer
//! than any fixed column width: every row's cells start at the offsets of the header's words
//! (right-aligned columns end where their header ends), whatever the values' lengths.

use crate::support::daemon::{run, Daemon};
use crate::support::lab::Lab;

/// Offsets where the header's words start.
fn header_offsets(header: &str) -> Vec<usize> {
    let b = header.as_bytes();
    (0..b.len())
        .filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' '))
        .collect()
}

/// Runs `imagectl ARGS` (human output), asserts exit 0, returns its lines.
fn table(d: &Daemon, args: &[&str]) -> Vec<String> {
    let out = d.imagectl(args);
    assert!(
        out.status.success(),
        "imagectl {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 table");
    text.lines().map(str::to_string).collect()
}

/// The left-aligned cell of `line` starting at `offsets[i]`: up to the next two spaces (the
/// column separator; values hold single spaces at most, e.g. "shut off").
fn cell<'a>(line: &'a str, offsets: &[usize], i: usize) -> &'a str {
    let rest = &line[offsets[i].min(line.len())..];
    rest[..rest.find("  ").unwrap_or(rest.len())].trim_end()
}

/// Every row has a column separator (a space) just before each left-aligned column's header
/// offset and just after each right-aligned column's header end (`right`: their indexes), so no
/// cell runs into the next column.
fn assert_separators(lines: &[String], offsets: &[usize], right: &[usize]) {
    let words: Vec<&str> = lines[0].split_whitespace().collect();
    for l in &lines[1..] {
        for (i, &o) in offsets.iter().enumerate() {
            let at = if right.contains(&i) {
                o + words[i].len() + 1
            } else if i > 0 {
                o
            } else {
                continue;
            };
            if at <= l.len() {
                assert_eq!(
                    &l[at - 1..at],
                    " ",
                    "a cell runs into its neighbour at column {}:\n{}",
                    words[i],
                    lines.join("\n")
                );
            }
        }
    }
}

#[test]
fn domains_table_rows_line_up_with_the_header() {
    let lab = Lab::get();
    let guest = lab
        .guest("tables-a-domain-name-longer-than-thirty-columns")
        .data_disk(64 << 20)
        .create();
    let d = Daemon::start();
    let lines = table(&d, &["domains"]);
    let offs = header_offsets(&lines[0]);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["DOMAIN", "STATE", "AGENT", "DISK", "FORMAT", "SIZE", "PATH"],
        "{}",
        lines.join("\n")
    );
    assert_separators(&lines, &offs, &[5]);

    let i = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some(guest.name()))
        .unwrap_or_else(|| panic!("{} not listed:\n{}", guest.name(), lines.join("\n")));
    let (sys, data) = (&lines[i], &lines[i + 1]);
    let all = lines.join("\n");
    assert_eq!(cell(sys, &offs, 0), guest.name(), "{all}");
    assert_eq!(cell(sys, &offs, 1), "shut off", "{all}");
    assert_eq!(cell(sys, &offs, 2), "yes", "{all}");
    assert_eq!(cell(sys, &offs, 3), "vda*", "{all}");
    assert_eq!(cell(sys, &offs, 4), "qcow2", "{all}");
    assert_eq!(
        &sys[offs[6]..],
        guest.disk_path().to_str().unwrap(),
        "{all}"
    );
    // The continuation row: blank name, state and agent; its disk at the same offsets.
    assert_eq!(data[..offs[3]].trim(), "", "{all}");
    assert_eq!(cell(data, &offs, 3), "vdb", "{all}");
    assert_eq!(
        &data[offs[6]..],
        guest.data_disk_paths()[0].to_str().unwrap(),
        "{all}"
    );
    // SIZE is right-aligned: it ends where the header's SIZE ends.
    let size_end = offs[5] + "SIZE".len();
    for row in [sys, data] {
        assert_ne!(&row[size_end - 1..size_end], " ", "{all}");
        assert_eq!(&row[size_end..size_end + 2], "  ", "{all}");
    }
}

#[test]
fn images_and_operations_tables_line_up_with_the_header() {
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.qcow2");
    let s = src.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", s, "16M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 1M", s]);
    let long = "an-image-name-much-longer-than-the-old-thirty-two-columns";
    for name in [long, "b"] {
        let out = d.imagectl(&["import", s, "--format", "qcow2", "--name", name]);
        assert!(
            out.status.success(),
            "import {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let lines = table(&d, &["images"]);
    let all = lines.join("\n");
    let offs = header_offsets(&lines[0]);
    assert_eq!(offs.len(), 6, "{all}");
    assert_separators(&lines, &offs, &[1, 2]);
    assert_eq!(lines.len(), 3, "{all}");
    let mut names: Vec<&str> = lines[1..].iter().map(|r| cell(r, &offs, 0)).collect();
    names.sort();
    assert_eq!(names, [long, "b"], "{all}");
    for row in &lines[1..] {
        // VIRTUAL ends where its header ends; CONSISTENT and SOURCE start at theirs.
        let virt_end = offs[2] + "VIRTUAL".len();
        assert!(row[..virt_end].ends_with("MiB"), "{all}");
        assert_eq!(cell(row, &offs, 3), "imported", "{all}");
        assert_eq!(cell(row, &offs, 4), "-", "{all}");
        assert!(cell(row, &offs, 5).starts_with("20"), "{all}");
    }

    let lines = table(&d, &["ops"]);
    let all = lines.join("\n");
    let offs = header_offsets(&lines[0]);
    assert_eq!(offs.len(), 6, "{all}");
    assert_separators(&lines, &offs, &[4]);
    assert_eq!(lines.len(), 3, "{all}");
    let mut names: Vec<&str> = lines[1..]
        .iter()
        .map(|row| {
            assert_eq!(cell(row, &offs, 1), "import", "{all}");
            assert_eq!(cell(row, &offs, 2), "active", "{all}");
            let done_end = offs[4] + "DONE".len();
            assert!(row[..done_end].ends_with("100%"), "{all}");
            assert!(cell(row, &offs, 5).starts_with("20"), "{all}");
            cell(row, &offs, 3)
        })
        .collect();
    names.sort();
    assert_eq!(names, [long, "b"], "{all}");
}
