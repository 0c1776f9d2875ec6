//! The operator page's files, built into the binary with `include_str!` from `src/ui/`: no
//! build step, no CDN, nothing fetched from the internet. The script is a file of its own
//! (`/ui/app.js`), never inline, so the endpoint's `Content-Security-Policy: default-src
//! 'self'` holds for the page.

/// The sign-in page with `message` (empty: none) and the path to go to after it, both
/// HTML-escaped.
pub fn login_page(message: &str, next: &str) -> String {
    include_str!("../ui/login.html")
        .replace("<!--message-->", &escape(message))
        .replace("<!--next-->", &escape(next))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

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
            "the sign-in page is rendered by login_page, not served as a file"
        );
        let p = login_page("Wrong <b>", "/x\"><script>");
        assert!(p.contains("Wrong &lt;b&gt;"), "{p}");
        assert!(p.contains("value=\"/x&quot;&gt;&lt;script&gt;\""), "{p}");
        assert!(!p.contains("<script"), "{p}");
        assert!(file("/ui/../Cargo.toml").is_none());
    }
}
