//! The contract between an agent and whoever drives it — the lab, the tests, `kubectl netpol
//! --lab`: the body of `GET /status` and the manifest directory's revision file. Both sides use
//! these definitions, so neither can drift from the other.
//!
//! Convergence: a writer puts its manifests in the directory, then a decimal number in
//! [`REVISION_FILE`] (written to a temporary name and renamed), then polls `/status` until
//! [`Status::enforced_revision`] reaches that number. With the Kubernetes source there is no
//! revision file; the writer compares [`Status::enforced_objects`] with the digest of the objects
//! the API server holds (`crate::digest`).

use std::{string::String, vec::Vec};

use serde::{Deserialize, Serialize};

/// Name of the revision file inside a manifest directory.
pub const REVISION_FILE: &str = ".revision";

/// What `GET /status` returns (JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The node the agent enforces for.
    pub node: String,
    /// The latest source revision received.
    pub revision: u64,
    /// The latest revision whose maps are in the kernel.
    pub enforced_revision: u64,
    /// Local endpoints enforced (interface found, entry written, programs attached).
    pub endpoints: u64,
    /// Current problems: invalid input, compile errors, endpoints not enforced, failed writes,
    /// installation faults. Each names the object (and file) and the field.
    pub errors: Vec<String>,
    /// The objects behind `enforced_revision`: their count and digest, comparable with the API
    /// server's lists.
    pub enforced_objects: ObjectsDigest,
    /// Why the source cannot currently read the cluster (per watched kind); the last state stays
    /// enforced meanwhile.
    pub source_errors: Vec<String>,
    /// A complete sync has been enforced at least once and nothing keeps the agent unready.
    pub ready: bool,
    /// Inside the agent only: installation problems that keep it unready whatever it enforces
    /// (each also in `errors`), such as a bpffs that is not the node's. Not on the wire; `ready`
    /// carries their effect.
    #[serde(skip)]
    pub unready: Vec<String>,
}

/// How many objects a state holds and their [`crate::digest`] sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectsDigest {
    pub count: u64,
    /// The wrapping sum of [`crate::digest::object_term`] over the objects; 16 hex digits on the
    /// wire.
    #[serde(with = "hex_u64")]
    pub digest: u64,
}

impl ObjectsDigest {
    /// Adds one object's term.
    pub fn add(&mut self, term: u64) {
        self.count += 1;
        self.digest = self.digest.wrapping_add(term);
    }

    /// Removes one object's term (added before).
    pub fn remove(&mut self, term: u64) {
        self.count -= 1;
        self.digest = self.digest.wrapping_sub(term);
    }
}

mod hex_u64 {
    use std::{format, string::String};

    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    #[test]
    fn digest_travels_as_sixteen_hex_digits_and_back() {
        let mut d = ObjectsDigest::default();
        d.add(0x0123_4567_89ab_cdef);
        d.add(u64::MAX);
        let json = serde_json::to_value(d).unwrap();
        assert_eq!(json["count"], 2);
        assert_eq!(json["digest"], "0123456789abcdee");
        let back: ObjectsDigest = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
        d.remove(u64::MAX);
        assert_eq!(d.digest, 0x0123_4567_89ab_cdef);
        assert_eq!(d.count, 1);
    }

    #[test]
    fn status_round_trips_and_tolerates_missing_fields() {
        let status = Status {
            node: "node-a".to_string(),
            revision: 7,
            enforced_revision: 6,
            endpoints: 3,
            errors: std::vec!["x.yaml: document 1: NetworkPolicy x/p: spec: bad".to_string()],
            enforced_objects: ObjectsDigest {
                count: 4,
                digest: 0xff,
            },
            source_errors: Vec::new(),
            ready: true,
            unready: Vec::new(),
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), status);
        // An older agent's body, without the newer fields, still reads.
        let old: Status = serde_json::from_str(r#"{"enforced_revision": 5}"#).unwrap();
        assert_eq!(old.enforced_revision, 5);
        assert_eq!(old.enforced_objects, ObjectsDigest::default());
        assert!(!old.ready);
        // A digest that is not hex is an error, not a silent zero.
        assert!(
            serde_json::from_str::<Status>(r#"{"enforced_objects":{"count":1,"digest":"zz"}}"#)
                .is_err()
        );
    }
}
