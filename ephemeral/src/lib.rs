//! The ephemeral controller: creates the PVCs behind generic ephemeral
//! volumes. Not implemented yet; see README.md.
