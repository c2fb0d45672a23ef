use policy_agent::dataplane::Dataplane;
use policy_common::Config;
use policy_tests::bpffs::PinDir;

#[test]
fn loads() {
    let dir = PinDir::new("smoke").unwrap();
    let dp = Dataplane::open(dir.path(), Config::DEFAULT).unwrap();
    println!("{dp:?}");
}
