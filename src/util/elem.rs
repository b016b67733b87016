//! The element types that cross between ranks and between a backend and the host: what a
//! collective can carry (`parallel::comm`) and what a backend stages its buffers through
//! (`Backend::Host`). Its own module so that neither of those two imports the other for it.

/// Element types a collective can carry. `KIND` picks the MPI datatype.
pub trait Elem: bytemuck::Pod + Default + PartialOrd + Send + Sync + 'static {
    const KIND: ElemKind;
    fn add(self, o: Self) -> Self;
    fn max_of(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F64,
    U8,
    I32,
    U64,
}

macro_rules! elem {
    ($t:ty, $k:ident) => {
        impl Elem for $t {
            const KIND: ElemKind = ElemKind::$k;
            fn add(self, o: Self) -> Self {
                self + o
            }
        }
    };
}
elem!(f32, F32);
elem!(f64, F64);
elem!(i32, I32);
elem!(u64, U64);
impl Elem for u8 {
    const KIND: ElemKind = ElemKind::U8;
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
}
