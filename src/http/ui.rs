//! The operator page's files, built into the binary with `include_str!` from `src/ui/`: no
//! build step, no CDN, nothing fetched from the internet. The script is a file of its own
//! (`/ui/app.js`), never inline, so the endpoint's `Content-Security-Policy: default-src
//! 'self'` holds for the page.

/// One embedded file.
pub struct File {
    /// `Content-Type` to answer with.
    pub content_type: &'static str,
    /// Its text.
    pub body: &'static str,
}

/// The file served at `path`, if there is one.
pub fn file(path: &str) -> Option<File> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", include_str!("../ui/index.html")),
        "/ui/app.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../ui/app.js"),
        ),
        "/ui/style.css" => ("text/css; charset=utf-8", include_str!("../ui/style.css")),
        _ => return None,
    };
    Some(File { content_type, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_only_files_that_are_served_and_has_no_inline_script() {
        let index = file("/").expect("index").body;
        for linked in ["/ui/app.js", "/ui/style.css"] {
            assert!(index.contains(linked), "{linked} not linked");
            assert!(file(linked).is_some(), "{linked} not served");
        }
        // A <script> element has a src, and no element has an inline handler.
        assert_eq!(
            index.matches("<script").count(),
            index.matches("<script src=").count()
        );
        assert!(!index.contains(" onclick="), "inline handler");
        assert!(
            file("/ui/login.html").is_none(),
            "the login page is not served yet"
        );
        assert!(file("/ui/../Cargo.toml").is_none());
    }
}
