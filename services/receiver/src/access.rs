//! Who may open an association: the scanner allow-list, deny by default.
//!
//! Each [`AllowEntry`] names a calling AE title, optionally the source address
//! (an IP or a CIDR) it must come from, and the called AE titles it may use.
//! The decision is made on the A-ASSOCIATE-RQ by [`Gate`], dicom-ul's
//! [`AccessControl`] for one connection (it knows the peer's address), and a
//! refused caller gets an A-ASSOCIATE-RJ (rejected-permanent, service-user):
//! - calling AE title not in the list, or listed but not from that address
//!   → reason 3, calling-AE-title-not-recognized;
//! - called AE title not one this caller may use → reason 7,
//!   called-AE-title-not-recognized.
//!
//! Syntax of the list (`BIDSFLUX_DICOM_ALLOWLIST`, entries separated by `;`;
//! `BIDSFLUX_DICOM_ALLOWLIST_FILE`, one entry a line, `#` starts a comment):
//!
//! ```text
//! CALLING[@IP-or-CIDR][=CALLED[,CALLED...]]
//! SCANNER1@10.0.0.0/24=BIDSFLUX,BIDSFLUX2
//! MRI2                      # from anywhere, may call BIDSFLUX_AE_TITLE only
//! ```

use std::net::IpAddr;
use std::sync::Arc;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};
use ipnet::IpNet;
use tracing::warn;

/// One allowed caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// Calling AE title (compared exactly, after trimming spaces, as DICOM does).
    pub calling_ae: String,
    /// Where the caller must connect from; `None`: anywhere.
    pub source: Option<IpNet>,
    /// Called AE titles it may use (never empty: defaults to our AE title).
    pub called_aes: Vec<String>,
}

impl AllowEntry {
    /// Parses `CALLING[@IP-or-CIDR][=CALLED[,CALLED...]]`; `our_ae` is the default called AE title.
    pub fn parse(text: &str, our_ae: &str) -> Result<Self, String> {
        let (left, called) = match text.split_once('=') {
            Some((l, r)) => (l, Some(r)),
            None => (text, None),
        };
        let (calling, source) = match left.split_once('@') {
            Some((c, s)) => (c, Some(s.trim())),
            None => (left, None),
        };
        let calling_ae = ae_title(calling, "calling AE title")?;
        let source = source
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| format!("{s:?} is not an IP address or CIDR (e.g. 10.0.0.7 or 10.0.0.0/24)"))
            })
            .transpose()?;
        let called_aes = match called {
            None => vec![our_ae.to_owned()],
            Some(list) => list.split(',').map(|t| ae_title(t, "called AE title")).collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Self { calling_ae, source, called_aes })
    }

    fn matches_source(&self, peer: IpAddr) -> bool {
        self.source.is_none_or(|net| net.contains(&peer.to_canonical()))
    }
}

/// Validates one AE title of the list: 1–16 characters of the DICOM default repertoire, no
/// backslash, none of the list's own separators.
fn ae_title(text: &str, what: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("empty {what}"));
    }
    if t.len() > 16 {
        return Err(format!("{what} {t:?} is longer than 16 characters"));
    }
    if !t.bytes().all(|b| (0x20..0x7f).contains(&b) && !b"\\@=,;#".contains(&b)) {
        return Err(format!("{what} {t:?} has a character that is not allowed (control, \\ @ = , ; #)"));
    }
    Ok(t.to_owned())
}

/// Parses a list of entries: `separator`-separated text, `#` comments removed (file lines).
/// Errors name the entry (by number and text).
pub fn parse_list(text: &str, separator: char, our_ae: &str) -> Result<Vec<AllowEntry>, String> {
    let mut entries = Vec::new();
    for (i, raw) in text.split(separator).enumerate() {
        let item = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if item.is_empty() {
            continue;
        }
        let entry = AllowEntry::parse(item, our_ae).map_err(|e| {
            let which = if separator == '\n' { "line" } else { "entry" };
            format!("{which} {} {item:?}: {e}", i + 1)
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The receiver's access policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Only the listed callers (never empty).
    AllowList(Vec<AllowEntry>),
    /// Any calling AE title from anywhere, as long as it calls our AE title
    /// (`BIDSFLUX_DICOM_ACCEPT_ANY=true`, development only).
    AcceptAny {
        /// Our AE title, the only one callers may use.
        our_ae: String,
    },
}

/// Why an association request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The calling AE title is not on the list.
    UnknownCaller,
    /// The calling AE title is on the list, but not from this address.
    WrongSource,
    /// The caller may not use this called AE title.
    WrongCalledAe,
}

impl Refusal {
    /// The A-ASSOCIATE-RJ reason sent (PS3.8 §9.3.4).
    pub fn rj_reason(self) -> AssociationRJServiceUserReason {
        match self {
            Self::UnknownCaller | Self::WrongSource => AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            Self::WrongCalledAe => AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        }
    }

    /// For logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCaller => "calling ae title not in the allow-list",
            Self::WrongSource => "calling ae title not allowed from this address",
            Self::WrongCalledAe => "called ae title not allowed for this caller",
        }
    }
}

impl Policy {
    /// Decides on a request from `peer` with these AE titles.
    pub fn check(&self, peer: IpAddr, calling_ae: &str, called_ae: &str) -> Result<(), Refusal> {
        match self {
            Self::AcceptAny { our_ae } => {
                if called_ae == our_ae {
                    Ok(())
                } else {
                    Err(Refusal::WrongCalledAe)
                }
            }
            Self::AllowList(entries) => {
                let mut known = false;
                let mut from_here = false;
                for entry in entries.iter().filter(|e| e.calling_ae == calling_ae) {
                    known = true;
                    if entry.matches_source(peer) {
                        from_here = true;
                        if entry.called_aes.iter().any(|c| c == called_ae) {
                            return Ok(());
                        }
                    }
                }
                Err(match (known, from_here) {
                    (false, _) => Refusal::UnknownCaller,
                    (true, false) => Refusal::WrongSource,
                    (true, true) => Refusal::WrongCalledAe,
                })
            }
        }
    }
}

/// dicom-ul's access control for one connection: the policy plus the peer's address.
#[derive(Debug, Clone)]
pub struct Gate {
    policy: Arc<Policy>,
    peer: IpAddr,
}

impl Gate {
    /// The gate for a connection from `peer`.
    pub fn new(policy: Arc<Policy>, peer: IpAddr) -> Self {
        Self { policy, peer }
    }
}

impl AccessControl for Gate {
    fn check_access(
        &self,
        _this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        self.policy.check(self.peer, calling_ae_title, called_ae_title).map_err(|refusal| {
            // The association span carries the peer address. AE titles are not PHI.
            warn!(
                calling_ae = calling_ae_title,
                called_ae = called_ae_title,
                reason = refusal.as_str(),
                "association rejected by the access policy"
            );
            refusal.rj_reason()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_documented_examples() {
        let list = parse_list("SCANNER1@10.0.0.0/24=BIDSFLUX,BIDSFLUX2; MRI2 ;", ';', "BIDSFLUX").unwrap();
        assert_eq!(
            list,
            vec![
                AllowEntry {
                    calling_ae: "SCANNER1".into(),
                    source: Some("10.0.0.0/24".parse().unwrap()),
                    called_aes: vec!["BIDSFLUX".into(), "BIDSFLUX2".into()],
                },
                AllowEntry { calling_ae: "MRI2".into(), source: None, called_aes: vec!["BIDSFLUX".into()] },
            ]
        );
        let file = "# scanners\nMR 1@192.168.1.7=ARCHIVE  # the 3T\n\n  CT@fd00::/8\n";
        let list = parse_list(file, '\n', "BIDSFLUX").unwrap();
        assert_eq!(list[0].calling_ae, "MR 1");
        assert_eq!(list[0].source, Some("192.168.1.7/32".parse().unwrap()));
        assert_eq!(list[0].called_aes, vec!["ARCHIVE".to_owned()]);
        assert_eq!(list[1].source, Some("fd00::/8".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_entry() {
        for (text, needle) in [
            ("OK;MRI2@10.0.0.300", "entry 2 \"MRI2@10.0.0.300\""),
            ("=BIDSFLUX", "empty calling AE title"),
            ("A_TITLE_WAY_TOO_LONG", "longer than 16"),
            ("MRI2=", "empty called AE title"),
            ("MR\\I", "not allowed"),
        ] {
            let e = parse_list(text, ';', "BIDSFLUX").unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = parse_list("OK\n\nBAD@x", '\n', "BIDSFLUX").unwrap_err();
        assert!(e.starts_with("line 3 \"BAD@x\""), "{e}");
    }

    #[test]
    fn decides_by_calling_ae_source_and_called_ae() {
        let list = parse_list("SCANNER1@10.0.0.0/24=BIDSFLUX,B2;SCANNER1@10.9.9.9=B3;MRI2", ';', "BIDSFLUX").unwrap();
        let p = Policy::AllowList(list);
        assert_eq!(p.check(ip("10.0.0.5"), "SCANNER1", "BIDSFLUX"), Ok(()));
        assert_eq!(p.check(ip("10.0.0.5"), "SCANNER1", "B2"), Ok(()));
        assert_eq!(p.check(ip("::ffff:10.0.0.5"), "SCANNER1", "B2"), Ok(()), "v4-mapped address");
        assert_eq!(p.check(ip("10.9.9.9"), "SCANNER1", "B3"), Ok(()));
        assert_eq!(p.check(ip("10.9.9.9"), "SCANNER1", "B2"), Err(Refusal::WrongCalledAe));
        assert_eq!(p.check(ip("10.0.1.5"), "SCANNER1", "BIDSFLUX"), Err(Refusal::WrongSource));
        assert_eq!(p.check(ip("10.0.0.5"), "SCANNER1", "OTHER"), Err(Refusal::WrongCalledAe));
        assert_eq!(p.check(ip("10.0.0.5"), "scanner1", "BIDSFLUX"), Err(Refusal::UnknownCaller));
        assert_eq!(p.check(ip("203.0.113.1"), "MRI2", "BIDSFLUX"), Ok(()));
        assert_eq!(p.check(ip("203.0.113.1"), "MRI2", "B2"), Err(Refusal::WrongCalledAe));
        assert_eq!(Refusal::WrongSource.rj_reason(), AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        assert_eq!(Refusal::WrongCalledAe.rj_reason(), AssociationRJServiceUserReason::CalledAETitleNotRecognized);

        let any = Policy::AcceptAny { our_ae: "BIDSFLUX".into() };
        assert_eq!(any.check(ip("203.0.113.1"), "WHOEVER", "BIDSFLUX"), Ok(()));
        assert_eq!(any.check(ip("203.0.113.1"), "WHOEVER", "OTHER"), Err(Refusal::WrongCalledAe));
    }
}
