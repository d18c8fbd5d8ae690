//! Run results rendered as self-contained HTML.
