fn main() {
    println!("ultralong");
}
