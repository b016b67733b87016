//! (in progress: data issue)
