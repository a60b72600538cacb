//! The AIP shape of `imaged.v1`, end to end against a real daemon without a hypervisor: resource
//! names, paging over 250 images with filter and order, `google.rpc` error details read as a
//! program would (ErrorInfo reason, BadRequest field), the long-running operation envelope
//! (typed metadata, the Image as `response`), Wait and Delete, UpdateImage with a field mask,
//! and the standard `google.longrunning.Operations` service serving the same operations.

use imaged::cli::view::OpView;
use imaged::proto as pb;
use imaged::proto::google::longrunning as lro;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::daemon::{clone_manifests, run, Daemon};

fn reason(s: &tonic::Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn field(s: &tonic::Status) -> String {
    s.get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_pages_errors_and_operations_follow_the_aips() {
    let d = Daemon::start();
    let ch = d.channel().await;
    let mut images = pb::image_service_client::ImageServiceClient::new(ch.clone());
    let mut ops = pb::operation_service_client::OperationServiceClient::new(ch.clone());
    let mut lro_ops = lro::operations_client::OperationsClient::new(ch.clone());

    // An import: the envelope at once, then Wait returns it done with the Image as response.
    let src = d.dir.path().join("disk.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", src.to_str().unwrap(), "8M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            src.to_str().unwrap(),
        ],
    );
    const RID: &str = "6f1c8a0e-4b55-4c1e-9d7a-1e2f3a4b5c6d";
    let import = |id: &str, format: pb::ImageFormat, description: &str, request_id: &str| {
        pb::ImportImageRequest {
            image_id: id.into(),
            path: src.to_str().unwrap().into(),
            format: format as i32,
            description: description.into(),
            request_id: request_id.into(),
        }
    };
    let raw = pb::ImageFormat::Raw;
    let started = images
        .import_image(import("p-000", raw, "first", RID))
        .await
        .unwrap()
        .into_inner();
    assert!(started.name.starts_with("operations/op-"), "{started:?}");
    let meta = OpView::from_lro(&started).meta;
    assert_eq!(meta.kind, pb::OperationKind::Import as i32);
    assert_eq!(meta.image, "images/p-000");
    let done = ops
        .wait_operation(pb::WaitOperationRequest {
            name: started.name.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.done, "{done:?}\n{}", d.log_text());
    let v = OpView::from_lro(&done);
    assert!(v.error.is_none(), "{:?}", v.error);
    let img = v.image.expect("the Image is the response");
    assert_eq!(img.name, "images/p-000");
    assert_eq!(img.display_name, "p-000");
    assert_eq!(img.description, "first");
    assert_eq!(img.virtual_size_bytes, 8 << 20);
    assert_eq!(img.consistency, pb::Consistency::Imported as i32);
    assert!(img.create_time.is_some());
    assert_eq!(v.meta.progress.unwrap().percent_done, 100);

    // The same request_id returns the same operation; with other parameters it is refused.
    let again = images
        .import_image(import("p-000", raw, "first", RID))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, started.name);
    let other = images
        .import_image(import("p-999", raw, "", RID))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");

    // Structured errors: a program reads the reason and the field, never the English.
    let e = images
        .get_image(pb::GetImageRequest {
            name: "images/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "IMAGE_NOT_FOUND")
    );
    let e = images
        .get_image(pb::GetImageRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason(&e), "INVALID_RESOURCE_NAME");
    assert_eq!(field(&e), "name");
    let e = images
        .import_image(import("p-000", raw, "", ""))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::AlreadyExists, "IMAGE_NAME_TAKEN")
    );
    let e = images
        .import_image(import("p-x", pb::ImageFormat::Unspecified, "", ""))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "format")
    );

    // 250 images, paged 100 at a time: every one once, in name order.
    clone_manifests(&d.repo, "p-000", "p-", 250);
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = images
            .list_images(pb::ListImagesRequest {
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(r.images.into_iter().map(|i| i.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "name order, no repeats");
    let r = images
        .list_images(pb::ListImagesRequest {
            filter: "name = \"images/p-01*\" AND consistency = IMPORTED".into(),
            order_by: "create_time desc".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = r.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "images/p-019",
            "images/p-018",
            "images/p-017",
            "images/p-016",
            "images/p-015"
        ]
    );
    assert!(!r.next_page_token.is_empty());
    let e = images
        .list_images(pb::ListImagesRequest {
            filter: "colour = red".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "filter")
    );

    // UpdateImage: display name and description by mask; other fields refused.
    let up = images
        .update_image(pb::UpdateImageRequest {
            image: Some(pb::Image {
                name: "images/p-000".into(),
                display_name: "golden web".into(),
                description: "ignored: not in the mask".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (up.display_name.as_str(), up.description.as_str()),
        ("golden web", "first")
    );
    let got = images
        .get_image(pb::GetImageRequest {
            name: "images/p-000".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.display_name, "golden web");
    let e = images
        .update_image(pb::UpdateImageRequest {
            image: Some(pb::Image {
                name: "images/p-000".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["size_bytes".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "update_mask")
    );

    // The standard Operations service serves the same operation; Delete forgets it.
    let std_op = lro_ops
        .get_operation(lro::GetOperationRequest {
            name: started.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (std_op.name.as_str(), std_op.done),
        (started.name.as_str(), true)
    );
    assert_eq!(
        std_op.metadata, done.metadata,
        "the same operation, unchanged since it ended"
    );
    let listed = lro_ops
        .list_operations(lro::ListOperationsRequest {
            filter: "kind = IMPORT AND done = true".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|o| o.name == started.name));
    lro_ops
        .delete_operation(lro::DeleteOperationRequest {
            name: started.name.clone(),
        })
        .await
        .unwrap();
    let e = ops
        .get_operation(pb::GetOperationRequest {
            name: started.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "OPERATION_NOT_FOUND")
    );

    // DeleteImage answers Empty; the image is gone.
    images
        .delete_image(pb::DeleteImageRequest {
            name: "images/p-249".into(),
        })
        .await
        .unwrap();
    let e = images
        .get_image(pb::GetImageRequest {
            name: "images/p-249".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
