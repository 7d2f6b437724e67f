//! The parts of a person both demo stores share: names, addresses in the right streets and
//! postcodes for each ward, contact details in Ofcom's fictional (drama) number ranges, and
//! the consent records that go with them.

use rand::Rng;
use serde_json::{Map, Value, json};
use time::{Date, Duration};

use super::{DistrictInfo, day_between, pick, ymd};

const FIRST_NAMES: &str =
    "Oliver, Amelia, George, Isla, Harry, Olivia, Jack, Emily, Thomas, Sophie,
    James, Jessica, William, Grace, Daniel, Chloe, Joseph, Hannah, Samuel, Lucy, David, Margaret,
    Peter, Susan, John, Patricia, Michael, Linda, Paul, Karen, Mohammed, Aisha, Ibrahim, Fatima,
    Yusuf, Maryam, Omar, Zainab, Ali, Khadija, Arjun, Priya, Rohan, Ananya, Sanjay, Deepa,
    Harpreet, Gurpreet, Rajesh, Meera, Tomasz, Agnieszka, Piotr, Katarzyna, Andrei, Ioana, Kwame,
    Ama, Chinedu, Ngozi, Oluwaseun, Folake, Abdi, Hodan, Wei, Mei, Hao, Linh, Siobhan, Ciaran,
    Niamh, Eilidh, Rhys, Cerys, Dylan, Seren, Leon, Marcia, Delroy, Precious, Jamal, Shanice, Emre,
    Elif, Rashida, Tariq, Nadia, Hamza, Leah";

const SURNAMES: &str = "Smith, Jones, Taylor, Brown, Williams, Wilson, Johnson, Davies, Robinson,
    Wright, Thompson, Evans, Walker, White, Roberts, Green, Hall, Wood, Jackson, Clarke, Hughes,
    Edwards, Turner, Shaw, Holmes, Atkinson, Harrison, Dobson, Charlton, Armstrong, Milburn,
    Fenwick, Ackroyd, Greenwood, Sutcliffe, Hirst, Khan, Ahmed, Hussain, Ali, Begum, Rahman, Islam,
    Uddin, Akhtar, Mahmood, Patel, Shah, Sharma, Singh, Kaur, Gill, Sandhu, Mistry, Chauhan, Nair,
    Kowalski, Nowak, Wisniewska, Popescu, Ionescu, Mensah, Owusu, Boateng, Okafor, Adeyemi,
    Okonkwo, Adebayo, Mohamed, Abdullahi, Warsame, Chen, Wang, Li, Tran, O'Brien, Murphy, Kelly,
    Byrne, MacDonald, Campbell, Lloyd, Morgan, Campbell-Brown, Francis, Grant, Yilmaz, Demir,
    Costa, Silva, Fernandes";

/// Where a ward is, for addresses and phone numbers. Lists are comma-separated.
struct Locale {
    ward: &'static str,
    town: &'static str,
    localities: &'static str,
    /// Postcode districts (outward codes) of the ward.
    outward: &'static str,
    streets: &'static str,
    /// A fictional (Ofcom drama range) landline prefix; three digits follow.
    landline: &'static str,
    /// Houses converted into flats (London terraces).
    flats: bool,
}

const LEEDS: &str = "0113 496 0";
const LONDON: &str = "020 7946 0";
const TYNESIDE: &str = "0191 498 0";
const GENERIC: &str = "01632 960";

const LOCALES: &[Locale] = &[
    Locale {
        ward: "E05011391",
        town: "Leeds",
        localities: "Cross Gates, Whinmoor, Swarcliffe",
        outward: "LS15, LS14",
        streets: "Station Road, Austhorpe Road, Farm Road, Poole Crescent, Coal Road,
            Kingsdale Gardens, Sandbed Lane, Barwick Road, Stanks Drive, Swarcliffe Avenue,
            Penda's Way, Manston Lane",
        landline: LEEDS,
        flats: false,
    },
    Locale {
        ward: "E05999001",
        town: "Leeds",
        localities: "Seacroft, Killingbeck, Gipton",
        outward: "LS14, LS9",
        streets: "York Road, Kentmere Avenue, Seacroft Crescent, Foundry Mill Drive, Asket Hill,
            Brooklands Avenue, Easterly Road, Ironwood Approach, South Parkway, Boggart Hill Drive",
        landline: LEEDS,
        flats: false,
    },
    Locale {
        ward: "E05013911",
        town: "London",
        localities: "Forest Gate",
        outward: "E7",
        streets: "Woodgrange Road, Capel Road, Durham Road, Sebert Road, Godwin Road, Hampton Road,
            Osborne Road, Bective Road, Romford Road, Earlham Grove",
        landline: LONDON,
        flats: true,
    },
    Locale {
        ward: "E05999002",
        town: "London",
        localities: "Stratford, Maryland",
        outward: "E15",
        streets: "Leytonstone Road, Maryland Road, Vicarage Lane, West Ham Lane, Chobham Road,
            Crownfield Road, Water Lane, Colegrave Road, Windmill Lane",
        landline: LONDON,
        flats: true,
    },
    Locale {
        ward: "E05016561",
        town: "Gateshead",
        localities: "Saltwell, Bensham",
        outward: "NE8",
        streets: "Saltwell Road, Bensham Road, Coatsworth Road, Whitehall Road, Rodsley Avenue,
            Dunsmuir Grove, Westminster Street, Cromwell Street, Kells Lane",
        landline: TYNESIDE,
        flats: false,
    },
    Locale {
        ward: "E05999003",
        town: "Gateshead",
        localities: "Deckham, Carr Hill, Sheriff Hill",
        outward: "NE8, NE9",
        streets: "Old Durham Road, Carr Hill Road, Split Crow Road, Sheriffs Highway, Church Road,
            Elgin Road, Derwentwater Road, Beacon Lough Road",
        landline: TYNESIDE,
        flats: false,
    },
    Locale {
        ward: "E05015957",
        town: "Iver",
        localities: "Iver Heath, Richings Park, Thorney",
        outward: "SL0",
        streets: "High Street, Thorney Lane North, Bathurst Walk, Church Road, Wood Lane,
            Slough Road, Swallow Street, Love Lane, Bangors Road North",
        landline: GENERIC,
        flats: false,
    },
    Locale {
        ward: "E05999004",
        town: "Uxbridge",
        localities: "Denham, Denham Green, Higher Denham",
        outward: "UB9",
        streets: "Village Road, Cheapside Lane, Oxford Road, Moorfield Road, Lindsey Road,
            Penn Drive, Denham Avenue, Tilehouse Lane",
        landline: GENERIC,
        flats: false,
    },
    Locale {
        ward: "E05999005",
        town: "Gerrards Cross",
        localities: "Chalfont Park, Austenwood",
        outward: "SL9",
        streets: "Packhorse Road, Oak End Way, Austenwood Lane, Bulstrode Way, Fulmer Road,
            Camp Road, Orchehill Avenue, Marsham Lane",
        landline: GENERIC,
        flats: false,
    },
];

/// Wards not in the table still get well-formed (if unreal) addresses.
const ELSEWHERE: Locale = Locale {
    ward: "",
    town: "Anytown",
    localities: "Northside, Southside",
    outward: "ZZ99",
    streets: "High Street, Church Lane, Mill Road, Park Avenue, Victoria Street",
    landline: GENERIC,
    flats: false,
};

fn locale(ward: &str) -> &'static Locale {
    LOCALES
        .iter()
        .find(|l| l.ward == ward)
        .unwrap_or(&ELSEWHERE)
}

/// Item `k` (wrapping) of a comma-separated list.
fn item(list: &'static str, k: usize) -> &'static str {
    let len = list.split(',').count();
    list.split(',')
        .nth(k % len.max(1))
        .map(str::trim)
        .unwrap_or_default()
}

fn any<R: Rng + ?Sized>(rng: &mut R, list: &'static str) -> &'static str {
    item(list, rng.random_range(0..list.split(',').count()))
}

/// Postcode unit letters: the inward code never uses C, I, K, M, O or V.
const UNIT_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";

/// Electors with this many consecutive numbers live on one street, two to a house, so the
/// register reads in walk order like a real one.
const PER_STREET: usize = 60;

/// A name and a postal address.
pub(super) struct Person {
    pub first_name: String,
    pub surname: String,
    pub address_line1: String,
    pub address_line2: String,
    pub town: String,
    pub postcode: String,
}

impl Person {
    /// A random name at the address of elector number `number` (1-based) of the district.
    /// Addresses involve no randomness, so electors with neighbouring numbers share a house.
    pub fn fresh<R: Rng + ?Sized>(rng: &mut R, district: &DistrictInfo, number: usize) -> Person {
        let loc = locale(&district.ward);
        let slot = number.saturating_sub(1);
        // A ward's districts interleave over its streets (8 apart), so addresses stay distinct;
        // past the end of the list house numbers carry on upwards.
        let street_no = (slot / PER_STREET) * 8 + district.index_in_ward;
        let streets = loc.streets.split(',').count().max(1);
        let house = (slot % PER_STREET) / 2 + 1 + (street_no / streets) * PER_STREET;
        let street = item(loc.streets, street_no);
        let address_line1 = match slot % 2 {
            0 if loc.flats && house.is_multiple_of(3) => format!("Flat A, {house} {street}"),
            _ if loc.flats && house.is_multiple_of(3) => format!("Flat B, {house} {street}"),
            _ => format!("{house} {street}"),
        };
        let address_line2 = if street_no.is_multiple_of(2) {
            item(loc.localities, street_no / 2)
        } else {
            ""
        };
        let letter = |k: usize| {
            char::from(
                UNIT_LETTERS
                    .get(k % UNIT_LETTERS.len())
                    .copied()
                    .unwrap_or(b'A'),
            )
        };
        let postcode = format!(
            "{} {}{}{}",
            item(loc.outward, street_no),
            (street_no * 7 + district.index_in_ward) % 9 + 1,
            letter(street_no * 3 + district.index_in_ward),
            letter(house / 12 * 7 + street_no),
        );
        Person {
            first_name: any(rng, FIRST_NAMES).to_owned(),
            surname: any(rng, SURNAMES).to_owned(),
            address_line1,
            address_line2: address_line2.to_owned(),
            town: loc.town.to_owned(),
            postcode,
        }
    }

    /// The name and address of an existing record (an elector who is also a member).
    pub fn from_record(record: &Value) -> Person {
        let s = |key: &str| {
            record
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Person {
            first_name: s("first_name"),
            surname: s("surname"),
            address_line1: s("address_line1"),
            address_line2: s("address_line2"),
            town: s("town"),
            postcode: s("postcode"),
        }
    }
}

/// `firstname.surname42@example.org`, on the reserved example domain.
pub(super) fn email<R: Rng + ?Sized>(rng: &mut R, first: &str, surname: &str) -> String {
    let slug = |s: &str| {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_lowercase()
    };
    format!(
        "{}.{}{}@example.org",
        slug(first),
        slug(surname),
        rng.random_range(1..100)
    )
}

/// A mobile in Ofcom's drama range, 07700 900000-900999.
pub(super) fn mobile<R: Rng + ?Sized>(rng: &mut R) -> String {
    format!("07700 900{:03}", rng.random_range(0..1000))
}

/// A landline in the ward's drama range, e.g. `0113 496 0123`.
pub(super) fn landline<R: Rng + ?Sized>(rng: &mut R, ward: &str) -> String {
    format!("{}{:03}", locale(ward).landline, rng.random_range(0..1000))
}

/// A consent record per channel: null without the contact detail or without consent.
pub(super) fn consents<R: Rng + ?Sized>(rng: &mut R, channels: &[(&str, bool)]) -> Value {
    let mut out = Map::new();
    for &(channel, reachable) in channels {
        let record = if reachable && rng.random_bool(0.6) {
            let given = day_between(rng, ymd(2025, 1, 1), ymd(2025, 12, 31));
            let withdrawn = rng.random_bool(0.15).then(|| {
                let later = given + Duration::days(rng.random_range(1..=330));
                timestamp(rng, later)
            });
            json!({
                "given_at": timestamp(rng, given),
                "source": pick(rng, &["doorstep", "web_form", "event"]),
                "withdrawn_at": withdrawn,
            })
        } else {
            Value::Null
        };
        out.insert(channel.to_owned(), record);
    }
    Value::Object(out)
}

fn timestamp<R: Rng + ?Sized>(rng: &mut R, day: Date) -> String {
    let (h, m, s) = (
        rng.random_range(8..21),
        rng.random_range(0..60),
        rng.random_range(0..60),
    );
    format!("{day}T{h:02}:{m:02}:{s:02}Z")
}
