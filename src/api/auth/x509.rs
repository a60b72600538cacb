//! The one field of a certificate that webpki does not hand out: the common name (CN) of the
//! subject. [`common_name`] reads it from the subject's DER (an RDNSequence), after webpki has
//! verified the certificate; anything it does not understand yields `None`, never a panic.

/// The DER of the attribute type id-at-commonName, 2.5.4.3.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// Splits one DER element off `input`: its tag, its contents and the rest.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The first common name in `subject`, the contents of a Name (webpki's `Cert::subject`,
/// without the outer SEQUENCE). Text types UTF8String, PrintableString and IA5String; a CN
/// of another type (BMPString, TeletexString) is skipped.
pub fn common_name(subject: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, rest) = element(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (tag, atv, rest) = element(atvs)?;
            atvs = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = element(atv)?;
            if tag != OID || oid != CN_OID {
                continue;
            }
            let (tag, text, _) = element(value)?;
            // UTF8String, PrintableString, IA5String.
            if matches!(tag, 0x0c | 0x13 | 0x16) {
                if let Ok(s) = std::str::from_utf8(text) {
                    return Some(s.to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One RDN SET holding one attribute `oid` = `text` of string type `tag`.
    fn rdn(oid: &[u8], tag: u8, text: &[u8]) -> Vec<u8> {
        let mut atv = vec![0x06, oid.len() as u8];
        atv.extend_from_slice(oid);
        atv.extend_from_slice(&[tag, text.len() as u8]);
        atv.extend_from_slice(text);
        let mut seq = vec![0x30, atv.len() as u8];
        seq.extend(atv);
        let mut set = vec![0x31, seq.len() as u8];
        set.extend(seq);
        set
    }

    #[test]
    fn finds_the_cn_among_other_attributes() {
        let org = [0x55, 0x04, 0x0a];
        let mut name = rdn(&org, 0x0c, b"Example");
        name.extend(rdn(CN_OID, 0x0c, b"cp1"));
        assert_eq!(common_name(&name).as_deref(), Some("cp1"));
        assert_eq!(
            common_name(&rdn(CN_OID, 0x13, b"printable")).as_deref(),
            Some("printable")
        );
        assert_eq!(common_name(&rdn(&org, 0x0c, b"no cn")), None);
        // A BMPString CN is not read; nor is garbage.
        assert_eq!(common_name(&rdn(CN_OID, 0x1e, b"\0a")), None);
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x31, 0x09, 0x30]), None);
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x02, 0x01, 0x00]), None);
    }

    #[test]
    fn long_lengths_are_read() {
        let long = vec![b'a'; 200];
        let mut atv = vec![0x06, 3, 0x55, 0x04, 0x03, 0x0c, 0x81, 200];
        atv.extend_from_slice(&long);
        let mut seq = vec![0x30, 0x81, atv.len() as u8];
        seq.extend(atv);
        let mut set = vec![0x31, 0x81, seq.len() as u8];
        set.extend(seq);
        assert_eq!(common_name(&set).unwrap().len(), 200);
    }
}
