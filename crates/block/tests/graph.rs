//! The node graph: names, inline children, busy nodes, replace.

use block::{BlockdevOptions, ChildRole, Edge, Graph, IoBuf, User};
use serde_json::{Value, json};

fn options(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_json(&v).unwrap()
}

async fn add_err(g: &Graph, v: Value) -> String {
    g.add(&options(v)).await.unwrap_err().to_string()
}

fn image(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn node_names_follow_qemu() {
    let g = Graph::new();
    g.add(&options(json!({"driver": "null-co", "node-name": "n0"})))
        .await
        .unwrap();
    assert_eq!(
        add_err(&g, json!({"driver": "null-co", "node-name": "n0"})).await,
        "Duplicate nodes with node-name='n0'"
    );
    assert_eq!(
        add_err(&g, json!({"driver": "null-co"})).await,
        "'node-name' must be specified for the root node"
    );
    assert_eq!(
        add_err(&g, json!({"driver": "null-co", "node-name": "1bad"})).await,
        "Invalid node-name: '1bad'"
    );
    assert_eq!(
        add_err(
            &g,
            json!({"driver": "null-co", "node-name": "abcdefghijabcdefghijabcdefghij12"})
        )
        .await,
        "Node name too long"
    );
    assert_eq!(
        add_err(
            &g,
            json!({"driver": "raw", "node-name": "r", "file": "nope"})
        )
        .await,
        "Cannot find device='nope' nor node-name='nope'"
    );
    // Failed adds leave nothing behind.
    assert_eq!(g.nodes().len(), 1);
}

#[tokio::test]
async fn file_and_raw_errors_follow_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.raw", 1 << 20);
    let g = Graph::new();
    assert_eq!(
        add_err(
            &g,
            json!({"driver": "file", "node-name": "f", "filename": "/nonexistent/x"})
        )
        .await,
        "Could not open '/nonexistent/x': No such file or directory"
    );
    let raw = |offset: u64, size: u64| {
        json!({"driver": "raw", "node-name": "r", "offset": offset, "size": size,
               "file": {"driver": "file", "filename": img}})
    };
    assert_eq!(
        add_err(&g, raw(512, 1000)).await,
        "Specified size is not multiple of 512"
    );
    assert_eq!(
        add_err(&g, raw(1_048_000, 4096)).await,
        "The sum of offset (1048000) and size (4096) has to be smaller or equal to the  \
         actual size of the containing file (1048576)"
    );
    assert!(g.nodes().is_empty(), "{:?}", g.nodes());
    let r = g.add(&options(raw(512, 4096))).await.unwrap();
    assert_eq!(r.length(), 4096);
}

#[tokio::test]
async fn inline_children_are_implicit_and_go_with_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.raw", 1 << 20);
    let g = Graph::new();
    let disk = g
        .add(&options(json!({"driver": "raw", "node-name": "disk0",
            "file": {"driver": "file", "filename": img}})))
        .await
        .unwrap();
    let names: Vec<String> = g.nodes().iter().map(|n| n.name().to_owned()).collect();
    assert_eq!(names, ["disk0", "#block001"]);
    let (role, edge) = &disk.children()[0];
    assert_eq!(*role, ChildRole::File);
    assert!(edge.node().is_implicit());
    assert_eq!(
        g.remove("#block001").await.unwrap_err().to_string(),
        "Node #block001 is not owned by the monitor"
    );
    g.remove("disk0").await.unwrap();
    assert!(g.nodes().is_empty());
}

#[tokio::test]
async fn nodes_in_use_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.raw", 1 << 20);
    let g = Graph::new();
    g.add(&options(
        json!({"driver": "file", "node-name": "f0", "filename": img}),
    ))
    .await
    .unwrap();
    let disk = g
        .add(&options(
            json!({"driver": "raw", "node-name": "disk0", "file": "f0"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        g.remove("f0").await.unwrap_err().to_string(),
        "Block device f0 is in use"
    );
    let export = Edge::new(&disk, User::Export("exp0".into()));
    assert_eq!(
        g.remove("disk0").await.unwrap_err().to_string(),
        "Node disk0 is in use"
    );
    drop(export);
    drop(disk);
    g.remove("disk0").await.unwrap();
    g.remove("f0").await.unwrap();
    assert_eq!(
        g.remove("nope").await.unwrap_err().to_string(),
        "Failed to find node with node-name='nope'"
    );
}

#[tokio::test]
async fn replace_moves_every_user_but_the_replacement_itself() {
    let g = Graph::new();
    let n0 = g
        .add(&options(
            json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
        ))
        .await
        .unwrap();
    let n1 = g
        .add(&options(
            json!({"driver": "null-co", "node-name": "n1", "size": 1048576}),
        ))
        .await
        .unwrap();
    let over0 = g
        .add(&options(
            json!({"driver": "raw", "node-name": "over0", "file": "n0"}),
        ))
        .await
        .unwrap();
    // n1's replacement candidate `top` has n0 as its child: that edge stays.
    let top = g
        .add(&options(
            json!({"driver": "raw", "node-name": "top", "file": "n0"}),
        ))
        .await
        .unwrap();
    let export = Edge::new(&n0, User::Export("exp0".into()));
    assert_eq!(n0.users().len(), 3);

    g.replace(&n0, &top).unwrap();
    assert_eq!(export.node().name(), "top");
    assert_eq!(over0.children()[0].1.node().name(), "top");
    assert_eq!(top.children()[0].1.node().name(), "n0");
    assert_eq!(n0.users().len(), 1);
    assert_eq!(top.users().len(), 2);

    // Requests through the moved edges reach the new node.
    top.bitmaps().add("b", None, false, false).unwrap();
    let (r, _) = over0.write(0, IoBuf::copy_from(&[1; 512], 1), false).await;
    r.unwrap();
    assert_eq!(top.bitmaps().info()[0].count, 65536);

    assert_eq!(
        g.replace(&n1, &n1).unwrap_err().to_string(),
        "Cannot replace node 'n1' with 'n1': a node cannot replace itself"
    );
}

#[tokio::test]
async fn inline_children_inherit_what_they_do_not_set() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, "d.raw", 1 << 20);
    let g = Graph::new();
    let disk = g
        .add(&options(
            json!({"driver": "raw", "node-name": "disk0", "read-only": true,
            "cache": {"direct": true},
            "file": {"driver": "file", "filename": img}}),
        ))
        .await
        .unwrap();
    let file = disk.children()[0].1.node();
    assert!(file.is_read_only());
    let align = file.limits().request_alignment;
    assert!(
        (512..=4096).contains(&align),
        "O_DIRECT inherited: alignment {align}"
    );
    let disk1 = g
        .add(&options(
            json!({"driver": "raw", "node-name": "disk1", "read-only": true,
            "file": {"driver": "file", "filename": img, "read-only": false}}),
        ))
        .await
        .unwrap();
    assert!(!disk1.children()[0].1.node().is_read_only());
}

/// Adds race each other and removals; names stay unique and a child that
/// a new node took cannot be deleted from under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_and_removes_keep_the_graph_consistent() {
    let g = std::sync::Arc::new(Graph::new());
    g.add(&options(
        json!({"driver": "null-co", "node-name": "base", "size": 1048576}),
    ))
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            // Half of them fight over one name.
            let name = if i % 2 == 0 {
                "same".to_owned()
            } else {
                format!("n{i}")
            };
            let added = g
                .add(&options(
                    json!({"driver": "raw", "node-name": name, "file": "base"}),
                ))
                .await
                .is_ok();
            let removed = g.remove("base").await.is_ok();
            (added, removed)
        }));
    }
    let mut added = 0;
    for t in tasks {
        let (a, removed) = t.await.unwrap();
        added += usize::from(a);
        assert!(!removed, "base was deleted while raw nodes used it");
    }
    assert_eq!(added, 9, "8 distinct names and one winner of 'same'");
    let names: std::collections::HashSet<String> =
        g.nodes().iter().map(|n| n.name().to_owned()).collect();
    assert_eq!(names.len(), g.nodes().len(), "duplicate names");
    assert_eq!(g.find("base").unwrap().users().len(), 9);
}
