//! The capacity controller: publishes `CSIStorageCapacity` objects per
//! (topology segment, storage class). Not implemented yet; see README.md.
