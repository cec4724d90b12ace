//! `images:` and captures: which host each image is captured from, and when.

use super::*;

pub(super) fn resolve_images(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Image> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.images.ok {
        let i = &e.value;
        let pin = i.pin.as_ref().and_then(|p| cx.parse::<Digest>(p, "copy the digest of a captured version, or remove the pin to deploy the newest capture"));
        let capture = i.capture.as_ref().map(|c| CaptureSource {
            host: c.from.value.clone(),
            generation: cx.generation(&c.generation),
        });
        out.insert(
            name.clone(),
            Image {
                os: i.os,
                description: i.description.clone(),
                capture,
                pin,
            },
        );
    }
    out
}

/// Where a host's own `actions.capture` names its image.
fn host_capture_loc(raw: &Raw, host: &str) -> Option<Loc> {
    let e = raw.hosts.ok.get(host)?;
    e.value
        .actions
        .as_ref()?
        .capture
        .as_ref()
        .map(|c| c.image.loc)
}

/// Normalise image `capture.from` into host capture actions and check the rules around them.
pub(super) fn resolve_captures(
    raw: &Raw,
    hosts: &mut IndexMap<String, Host, FxBuildHasher>,
    cx: &mut Cx,
) {
    for (iname, e) in &raw.images.ok {
        let Some(c) = &e.value.capture else { continue };
        if !raw
            .hosts
            .check_ref(cx, &c.from, || format!("image `{iname}` capture"))
        {
            continue;
        }
        let Some(h) = hosts.get_mut(&c.from.value) else {
            continue;
        };
        match &h.actions.capture {
            Some(a) if a.image != *iname => {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "host `{}` is the capture source of images `{}` and `{iname}`",
                            h.name, a.image
                        ),
                        c.from.loc,
                    )
                    .note_opt(
                        host_capture_loc(raw, &h.name)
                            .map(|l| (format!("`{}` captures `{}` here", h.name, a.image), l)),
                    )
                    .hint(
                        "a host captures one image; capture the other from another reference host",
                    ),
                );
            }
            Some(a) if a.generation != c.generation.value => {
                cx.err(
                    Diagnostic::new(format!("image `{iname}` asks for capture generation {} but host `{}` asks for {}", c.generation.value, h.name, a.generation), c.generation.loc)
                        .note_opt(host_capture_loc(raw, &h.name).map(|l| (format!("`{}` asks here", h.name), l)))
                        .hint("keep the capture in one place: under the image or under the host's actions"),
                );
            }
            _ => {
                h.actions.capture = Some(CaptureAction {
                    image: iname.clone(),
                    generation: c.generation.value,
                });
            }
        }
    }
    // One capture source per image.
    let mut source: HashMap<&str, &str> = HashMap::new();
    for h in hosts.values() {
        let Some(c) = &h.actions.capture else {
            continue;
        };
        if let Some(other) = source.insert(&c.image, &h.name)
            && other != h.name
        {
            let loc = raw.hosts.ok.get(&h.name).map(|e| e.loc).unwrap_or_default();
            let mut d = Diagnostic::new(
                format!(
                    "image `{}` is captured from two hosts: `{other}` and `{}`",
                    c.image, h.name
                ),
                loc,
            )
            .hint("an image has one reference host; pick one");
            if let Some(e) = raw.hosts.ok.get(other) {
                d = d.note(format!("`{other}` is defined here"), e.loc);
            }
            cx.err(d);
        }
        if h.image.as_deref() == Some(c.image.as_str()) {
            let loc = raw
                .hosts
                .ok
                .get(&h.name)
                .and_then(|e| e.value.image.as_ref().map(|i| i.loc))
                .or_else(|| raw.hosts.ok.get(&h.name).map(|e| e.loc))
                .unwrap_or_default();
            let mut d = Diagnostic::new(format!("host `{}` is the capture source of image `{}` and is also assigned to deploy it", h.name, c.image), loc)
                .hint("a reference machine is captured, not overwritten: remove its `image:` (or pick another reference host)");
            if let Some(cap) = raw
                .images
                .ok
                .get(&c.image)
                .and_then(|i| i.value.capture.as_ref())
            {
                d = d.note("captured from it here", cap.from.loc);
            }
            cx.err(d);
        }
    }
}
