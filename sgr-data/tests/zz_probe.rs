//! temp probe
mod common;
#[test]
fn probe() {
    for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg] {
        let full = common::encoded_image(64, 48, format);
        for keep in [full.len() / 2, full.len() - 20, full.len() - 1] {
            let r = sgr_data::decode_rgb_bytes(&full[..keep], std::path::Path::new("x"));
            eprintln!(
                "{format:?} {keep}/{}: {:?}",
                full.len(),
                r.map(|i| (i.width, i.height)).map_err(|e| e.to_string())
            );
        }
    }
}
